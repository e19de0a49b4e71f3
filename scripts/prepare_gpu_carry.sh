#!/usr/bin/env bash
# Prepare what the GPU machine needs beside the working tree (it has torch 2.11 + Triton 3.6 and most of the
# scientific stack, Python 3.12, no internet):
#   .whl/     DeepSpeed 0.19.8 and the pure-Python / manylinux packages it needs that the machine lacks
#             (hjson, pydantic + pydantic-core, annotated-types, typing-inspection, typing-extensions),
#             torchao 0.18.0 (FP8 rows)
#   .parity/  a copy of ../shared/parity (the fp32 GPU parity section reads $VAVAE_PARITY_DIR)
#   .suite_commit  HEAD (+dirty): the commit the results name (the machine's .git can be an older snapshot)
#   .authors/ the authors' code for bench.authors_vae and bench.authors_dit (never committed): hustvl/LightningDiT's
#             vavae/, models/, transport/, configs/ and train.py
#             (from $AUTHORS_GIT, a local clone or bare mirror, else the fetch tool's mirror at
#             /work/.mirror/hustvl+LightningDiT/repo, else cloned from GitHub) and the taming package
#             their ldm imports (taming-transformers-rom1504 0.0.6: CompVis/taming-transformers' master on PyPI)
# All are git-ignored; carry them with the run. Then, on the machine:
#   VAVAE_PARITY_DIR=$PWD/.parity OUT=$OUT bash bench/gpu_suite.sh --part A
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.parity/' .git/info/exclude 2>/dev/null || echo '/.parity/' >> .git/info/exclude
grep -qx '/.suite_commit' .git/info/exclude 2>/dev/null || echo '/.suite_commit' >> .git/info/exclude
grep -qx '/.authors/' .git/info/exclude 2>/dev/null || echo '/.authors/' >> .git/info/exclude
echo "$(git rev-parse HEAD)$( [ -n "$(git status --porcelain --untracked-files=no)" ] && echo +dirty)" > .suite_commit
rm -rf .whl && mkdir -p .whl
PIP="${PIP:-python3 -m pip}"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  torchao==0.18.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 \
  einops==0.8.2 torchdiffeq==0.2.5   # the set that ran the trainer on an H200, 2026-11-26; the last two: the
                                     # authors' pos_embed.py and transport/ (bench.authors_dit)
$PIP wheel -q --no-deps -w .whl deepspeed==0.19.8
rm -rf .parity && cp -r ../shared/parity .parity && chmod -R u+w .parity
rm -rf .authors && mkdir -p .authors/LightningDiT
src="${AUTHORS_GIT:-}"
mirror=/work/.mirror/hustvl+LightningDiT/repo  # where the session's `fetch github:hustvl/LightningDiT` puts it
[ -z "$src" ] && [ -d "$mirror" ] && src="$mirror"
if [ -z "$src" ]; then
  src="$(mktemp -d)/LightningDiT"
  git clone -q --depth 1 https://github.com/hustvl/LightningDiT "$src" 2>/dev/null || {
    echo "prepare_gpu_carry.sh: the authors' code: no AUTHORS_GIT, no $mirror and GitHub unreachable;" \
         "fetch github:hustvl/LightningDiT (the session's fetch tool) or set AUTHORS_GIT to a clone or bare mirror" >&2
    exit 1; }
fi
# vavae/: their tokenizer trainer (bench.authors_vae); models/, transport/, configs/, train.py: their DiT trainer's
# step (bench.authors_dit)
parts="vavae models transport configs train.py"
git -C "$src" archive HEAD $parts 2>/dev/null | tar -x -C .authors/LightningDiT \
  || git --git-dir="$src" archive HEAD $parts | tar -x -C .authors/LightningDiT
git -C "$src" rev-parse HEAD 2>/dev/null > .authors/LightningDiT/COMMIT || git --git-dir="$src" rev-parse HEAD > .authors/LightningDiT/COMMIT
tmpw="$(mktemp -d)" && $PIP download -q --no-deps -d "$tmpw" taming-transformers-rom1504==0.0.6
python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(n, '.authors') for n in z.namelist() if n.startswith('taming/')]" "$tmpw"/taming_transformers_rom1504-0.0.6-py3-none-any.whl
ls .whl; du -sh .whl .parity .authors; echo "commit: $(cat .suite_commit); authors: $(cat .authors/LightningDiT/COMMIT)"
