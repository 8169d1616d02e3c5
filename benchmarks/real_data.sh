#!/usr/bin/env bash
# Train, segment and score the bundle on the two real MRI sets with a CPU-sized
# profile (configs/quick.yaml plus a longer schedule), timing each step.
#   bash benchmarks/real_data.sh [DATA_DIR] [OUTPUT_DIR]
# DATA_DIR defaults to ../shared/data, OUTPUT_DIR to runs/. Each set's models,
# logs and evaluation tables land in OUTPUT_DIR/<set>/, and the step times in
# OUTPUT_DIR/<set>/times.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

data_dir="${1:-../shared/data}"
output_dir="${2:-runs}"
epochs="${EPOCHS:-10}"
iterations="${ITERATIONS:-40}"

for set_name in msd_brats_patches ibsi_sts_t1; do
    if [[ ! -d "$data_dir/$set_name" ]]; then
        echo "error: $data_dir/$set_name not found. Pass the folder that contains msd_brats_patches/ and ibsi_sts_t1/ as the first argument." >&2
        exit 2
    fi
done

run_set() {
    local name="$1" dataset="$2" modalities="$3" pattern="$4" folds="$5" fold="$6"
    local root="$output_dir/$name"
    local common=(--bundle_root "$root" --dataset_dir "$dataset" --modalities "$modalities"
                  --patient_pattern "$pattern" --num_folds "$folds" --fold "$fold")
    mkdir -p "$root"
    : > "$root/times.txt"
    echo "$name: training, log in $root/train.log"

    local start=$SECONDS
    python -m monai.bundle run training --config_file "['configs/train.yaml','configs/quick.yaml']" \
        "${common[@]}" --generate_phantom False --max_epochs "$epochs" --iterations_per_epoch "$iterations" \
        --val_interval "$epochs" > "$root/train.log" 2>&1 || { echo "error: training failed, see $root/train.log" >&2; exit 1; }
    echo "training_seconds $((SECONDS - start))" >> "$root/times.txt"

    start=$SECONDS
    echo "$name: evaluation, log in $root/evaluate.log"
    python -m monai.bundle run --config_file "['configs/inference.yaml','configs/evaluate.yaml','configs/quick.yaml']" \
        "${common[@]}" > "$root/evaluate.log" 2>&1 || { echo "error: evaluation failed, see $root/evaluate.log" >&2; exit 1; }
    echo "evaluation_seconds $((SECONDS - start))" >> "$root/times.txt"
    cat "$root/times.txt" "$root/outputs/evaluation/summary.md"
}

# MSD BraTS crops: T1, T2 and FLAIR stand in for T1, T2 and STIR; two patients,
# so two folds, trained on brats_009 and scored on brats_119.
run_set brats "$data_dir/msd_brats_patches" "['t1','t2','flair']" '^(brats_\d+)_p' 2 1

# Soft-tissue sarcoma T1: the one-modality network, 3.27 mm slices, five folds by patient.
run_set sts "$data_dir/ibsi_sts_t1" "['t1']" '^(STS_\d+)$' 5 0
