#!/usr/bin/env bash
# The Soft-Di[M]O ablation (issue 11): five arms from the same Di[M]O checkpoint, same GAN-phase length, one after
# another, each in runs/mnist_gan_ablation/<arm>/ (eval.json, fit.log). Then: python scripts/gan_table.py.
#   scripts/gan_ablation.sh CKPT [ARM ...] [-- extra dimo fit flags]
# Arms: dimo_only dimo_gan gan_only dimo_gan_noaug gan_only_noaug (the default five), dimo_gan_soft, dimo_cov and
# dimo_gan_cov (the coverage term without / with the GAN; every other arm has coverage_weight 0). Set DIMO to the command that
# runs `dimo` (default: python -m dimo_lightning), e.g. DIMO="/work/wt/slot B python -m dimo_lightning".
set -euo pipefail
ckpt=${1:?usage: scripts/gan_ablation.sh CKPT [ARM ...] [-- extra flags]}
shift
arms=()
while [[ $# -gt 0 && $1 != "--" ]]; do arms+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
extra=("$@")
[[ ${#arms[@]} -eq 0 ]] && arms=(dimo_only dimo_gan gan_only dimo_gan_noaug gan_only_noaug)
read -r -a dimo <<< "${DIMO:-python -m dimo_lightning}"
nocov=(--model.init_args.gan.coverage_weight=0)  # the GAN arms of the first table ran before the coverage term
for arm in "${arms[@]}"; do
  case $arm in
    dimo_only) flags=(--model.init_args.gan.weight=0 "${nocov[@]}") ;;
    dimo_gan) flags=("${nocov[@]}") ;;
    dimo_cov) flags=(--model.init_args.gan.weight=0) ;;          # the coverage term without the discriminator
    dimo_gan_cov) flags=() ;;                                     # configs/mnist/dimo_gan.yaml as it is
    gan_only) flags=(--model.init_args.gan.only=true "${nocov[@]}") ;;
    dimo_gan_noaug) flags=(--model.init_args.gan.mask_augment=false "${nocov[@]}") ;;
    gan_only_noaug) flags=(--model.init_args.gan.only=true --model.init_args.gan.mask_augment=false "${nocov[@]}") ;;
    dimo_gan_soft) flags=(--model.init_args.gan.fake_input=soft "${nocov[@]}") ;;  # the paper's soft fake input
    *) echo "unknown arm: $arm" >&2; exit 2 ;;
  esac
  mkdir -p runs/mnist_gan_ablation
  echo "== $arm: ${flags[*]} ${extra[*]}"
  start=$(date +%s)
  "${dimo[@]}" fit --config configs/mnist/dimo_gan.yaml --config configs/mnist/ablations/gan_base.yaml \
    --trainer.logger.init_args.version="$arm" --trainer.enable_progress_bar=false \
    --model.init_args.student_init="$ckpt" "${flags[@]}" "${extra[@]}" > "runs/mnist_gan_ablation/$arm.log" 2>&1
  echo "$arm: $(( $(date +%s) - start )) s" | tee -a runs/mnist_gan_ablation/times.txt
done
