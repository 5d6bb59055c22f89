#!/usr/bin/env bash
# The training-recipe ablation of the README: runs every setting (LeNet5-Caffe and
# LeNet-500-300 on the full MNIST; several seeds where the table shows them), keeps each
# run's JSON report in docs/runs/, and writes the table to docs/ablation.md.
#
#     scripts/ablation.sh            # everything missing (about 4 hours on 2 cores)
#     scripts/ablation.sh --table    # only the table, from the reports already there
#
# A setting whose report exists is skipped, so an interrupted run resumes where it
# stopped. Reports written before a field existed carry it filled in from the command
# below (lr, noise lr and KL weights of l5_kl100_s0 and mlp_plain_s0).
set -euo pipefail
cd "$(dirname "$0")/.."
export SBP_DATA_DIR="${SBP_DATA_DIR:-../shared/data}"
runs=docs/runs
mkdir -p "$runs"
cargo build --release --quiet --example lenet5_mnist --example lenet500_300_mnist --example ablation

# run NAME EXAMPLE FLAGS...: one training run, unless its report is already there.
run() {
    local name=$1 example=$2
    shift 2
    if [[ -f $runs/$name.json ]]; then
        return
    fi
    echo "== $name: $example $*"
    ./target/release/examples/"$example" --quiet "$@" --report "$runs/$name.json" \
        --out "${TMPDIR:-/tmp}/$name.safetensors" --plot "${TMPDIR:-/tmp}/$name.png"
}

if [[ ${1:-} != --table ]]; then
    # LeNet5-Caffe: 5 dense + 30 SBP epochs throughout.
    run l5_paper30_s0 lenet5_mnist --recipe paper --epochs 30 --seed 0
    run l5_plain_s0 lenet5_mnist --recipe quick --epochs-pretrain 5 --epochs 30 --seed 0
    for s in 0 1; do
        run l5_kl30_s$s lenet5_mnist --kl-weight sbp1=30 --kl-weight sbp2=30 --kl-warmup 0 --seed $s
    done
    for s in 0 1 2; do
        run l5_kl50_s$s lenet5_mnist --kl-weight sbp1=50 --kl-weight sbp2=50 --kl-warmup 0 --seed $s
    done
    for s in 0 1 2; do
        run l5_kl100_s$s lenet5_mnist --kl-weight sbp1=100 --kl-weight sbp2=100 --kl-warmup 0 --seed $s
    done
    run l5_kl100w10_s1 lenet5_mnist --kl-weight sbp1=100 --kl-weight sbp2=100 --kl-warmup 10 --seed 1
    run l5_quick_s0 lenet5_mnist --recipe quick --seed 0

    # LeNet-500-300: 20 dense + 50 SBP epochs throughout.
    run mlp_paper50_s0 lenet500_300_mnist --recipe paper --epochs 50 --seed 0
    run mlp_plain_s0 lenet500_300_mnist --kl-weight sbp0=1 --kl-weight sbp1=1 --kl-weight sbp2=1 --seed 0
    for s in 0 1 2; do
        run mlp_kl2_s$s lenet500_300_mnist --seed $s
    done
    run mlp_quick_s0 lenet500_300_mnist --recipe quick --seed 0
fi

# The table, in the order of the ablation (settings without a report yet are left out).
reports=()
for name in l5_paper30_s0 l5_plain_s0 l5_kl30_s0 l5_kl30_s1 l5_kl50_s0 l5_kl50_s1 l5_kl50_s2 \
    l5_kl100_s0 l5_kl100_s1 l5_kl100_s2 l5_kl100w10_s1 l5_quick_s0 \
    mlp_paper50_s0 mlp_plain_s0 mlp_kl2_s0 mlp_kl2_s1 mlp_kl2_s2 mlp_quick_s0; do
    if [[ -f $runs/$name.json ]]; then
        reports+=("$runs/$name.json")
    fi
done
./target/release/examples/ablation "${reports[@]}" --out docs/ablation.md
