#!/usr/bin/env bash
# The Soft-Di[M]O ablation: arms from the same Di[M]O checkpoint, same phase length, one after another,
# each in runs/mnist_gan_ablation/<arm>/ (eval.json, <arm>.log). Then: python scripts/gan_table.py.
#   scripts/gan_ablation.sh CKPT [ARM ...] [-- extra dimo fit flags]
# Arms (all by default): dimo_only, dimo_gan, dimo_gan_noaug, gan_only, gan_only_noaug (no coverage term),
# dimo_cov (configs/mnist/dimo_gan.yaml as it is: the coverage term, no discriminator), dimo_gan_cov,
# dimo_gan_cov_noaug (the config plus the GAN, with / without mask augmentation), dimo_gan_soft (the paper's soft fake
# input, no coverage). The GAN arms use weight GAN_WEIGHT (default 10). Set DIMO to the command that runs `dimo`
# (default: python -m dimo_lightning), e.g. DIMO="taskset -c 1 python -m dimo_lightning" to pin the arms to one core.
set -euo pipefail
ckpt=${1:?usage: scripts/gan_ablation.sh CKPT [ARM ...] [-- extra flags]}
shift
arms=()
while [[ $# -gt 0 && $1 != "--" ]]; do arms+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
extra=("$@")
[[ ${#arms[@]} -eq 0 ]] && arms=(dimo_only dimo_gan dimo_gan_noaug gan_only gan_only_noaug dimo_cov dimo_gan_cov
                                 dimo_gan_cov_noaug)
read -r -a dimo <<< "${DIMO:-python -m dimo_lightning}"
nocov=(--model.init_args.gan.coverage_weight=0)
gan=(--model.init_args.gan.weight="${GAN_WEIGHT:-10}")
noaug=(--model.init_args.gan.mask_augment=false)
for arm in "${arms[@]}"; do
  case $arm in
    dimo_only) flags=(--model.init_args.gan.weight=0 "${nocov[@]}") ;;
    dimo_gan) flags=("${gan[@]}" "${nocov[@]}") ;;
    dimo_gan_noaug) flags=("${gan[@]}" "${noaug[@]}" "${nocov[@]}") ;;
    gan_only) flags=("${gan[@]}" --model.init_args.gan.only=true "${nocov[@]}") ;;
    gan_only_noaug) flags=("${gan[@]}" --model.init_args.gan.only=true "${noaug[@]}" "${nocov[@]}") ;;
    dimo_cov) flags=(--model.init_args.gan.weight=0) ;;
    dimo_gan_cov) flags=("${gan[@]}") ;;
    dimo_gan_cov_noaug) flags=("${gan[@]}" "${noaug[@]}") ;;
    dimo_gan_soft) flags=("${gan[@]}" --model.init_args.gan.fake_input=soft "${nocov[@]}") ;;
    *) echo "unknown arm: $arm" >&2; exit 2 ;;
  esac
  mkdir -p runs/mnist_gan_ablation
  echo "== $arm: ${flags[*]} ${extra[*]}"
  start=$(date +%s)
  "${dimo[@]}" fit --config configs/mnist/dimo_gan.yaml --config configs/mnist/ablations/gan_base.yaml \
    --trainer.logger.init_args.version="$arm" --trainer.enable_progress_bar=false \
    --model.init_args.run.student_init="$ckpt" "${flags[@]}" "${extra[@]}" > "runs/mnist_gan_ablation/$arm.log" 2>&1
  echo "$arm: $(( $(date +%s) - start )) s" | tee -a runs/mnist_gan_ablation/times.txt
done
