#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one call, under 9 minutes on one H100:
#
#   benchmarks/gpu_suite.sh OUT_DIR          # on a GPU: the 350m shape
#   benchmarks/gpu_suite.sh OUT_DIR tiny     # anywhere, in a minute: tiny sizes (tests/test_gpu_suite.py)
#
# 1. Training: cm3jax's best measured 350m setting (batch 8, no remat, unrolled layers, cuDNN
#    attention, the loss fused with the head) beside the PyTorch peer's training step.
# 2. Sampling: 16 images x 1,024 codes with CFG (32 rows), phases of 0 and 256 steps, bf16 and
#    int8 weights, each against its HBM floor, beside the peer's eager generate.
# Writes OUT_DIR/gpu_suite.md (one table, then each benchmark's own table) and the raw outputs.
# The peer is PEER_TORCH (default .bench/peer_torch.py: copy ../shared/bench there and carry
# it); without it the table says so. A part that fails or runs out of time leaves its row empty
# and the others run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [tiny]}
size=${2:-350m}
peer=${PEER_TORCH:-.bench/peer_torch.py}
mkdir -p "$out"

if [ "$size" = tiny ]; then
  train=(--sizes=tiny --batch=8 --steps=1 --ceiling_size=256)
  peer_args=(--size tiny --vocab 2048 --seq 128 --batch 2 --streams 4 --new-tokens 16)
  sample=(--config=configs/tiny.py --images=2 --tokens=32 --repeats=1 --phase_steps=0,16)
  limit=(120 120 120)
else
  train=(--sizes=350m --batch=8 --remat=none --attention=cudnn --scan=false --ce_chunk=1024
         --steps=5)
  peer_args=(--size 350m)
  sample=(--config=configs/350m.py --images=16 --tokens=1024 --repeats=3 --phase_steps=0,256)
  limit=(200 150 170)
fi

SECONDS=0
timeout "${limit[0]}" python -m benchmarks.train_step "${train[@]}" > "$out/train.txt" 2>&1
echo "train: exit $?, ${SECONDS}s" | tee "$out/parts.txt"
if [ -f "$peer" ]; then
  OUT="$out" timeout "${limit[1]}" python "$peer" "${peer_args[@]}" --parts ceil,train,gen \
      > "$out/peer.txt" 2>&1
  echo "peer: exit $?, ${SECONDS}s" | tee -a "$out/parts.txt"
else
  echo "peer: no $peer" | tee -a "$out/parts.txt"
fi
timeout "${limit[2]}" python -m benchmarks.sample "${sample[@]}" --quantize=none,int8 \
    > "$out/sample.txt" 2>&1
echo "sample: exit $?, ${SECONDS}s" | tee -a "$out/parts.txt"

python - "$out" "$size" <<'EOF'
import glob, json, os, sys

out, size = sys.argv[1:]


def rows(name):
  """The data rows of the markdown table in OUT/NAME, as lists of cells."""
  path = os.path.join(out, name)
  if not os.path.exists(path):  # local file: this script's own output
    return []
  with open(path) as f:  # local file: this script's own output
    lines = [l.strip() for l in f if l.startswith("| ") and not l.startswith("| size")
             and not l.startswith("| model")]
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def number(text):
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return None


peer = {}
for path in glob.glob(os.path.join(out, "peer_*.json")):
  with open(path) as f:  # local file: the peer's output
    peer = json.load(f)
train = [r for r in rows("train.txt") if len(r) >= 12 and number(r[8]) is not None]
best = max(train, key=lambda r: number(r[8]), default=None)
peer_train = peer.get(f"train_{size}", {}).get("tokens_per_s")
peer_gen = next((v["wall_s"] for k, v in peer.items() if k.startswith("gen_")), None)
missing = lambda part: peer.get(f"{part}_error", "not run")[:80] if peer else "no figures"
table = ["| part | setting | cm3jax | peer | cm3jax over peer | notes |", "|---|---|---|---|---|---|"]
if best:
  ratio = f"{number(best[8]) / peer_train:.2f}x" if peer_train else ""
  peer_cell = f"{peer_train:,.0f} tokens/s" if peer_train else missing("train")
  table.append(f"| training | {best[0]}, batch {best[1]}, remat {best[2]}, scan {best[4]}, "
               f"ce_chunk {best[5]} | {best[8]} tokens/s | {peer_cell} | {ratio} | "
               f"MFU {best[10]}, {best[11]} GiB |")
else:
  table.append("| training | | failed: see train.txt | | | |")
for r in rows("sample.txt"):
  if len(r) < 13:
    continue
  wall = number(r[8])
  ratio = f"{peer_gen / wall:.1f}x faster" if peer_gen and wall else ""
  peer_cell = f"{peer_gen:.2f} s (eager generate)" if peer_gen else missing("gen")
  table.append(f"| sampling | {r[1]} codes, {r[2]} rows, phases {r[3]}, {r[4]} weights "
               f"({r[5]} MB) | {r[8]} s | {peer_cell} | {ratio} | {r[11]}x its HBM floor, "
               f"codes as row 1: {r[12]} |")
if len(table) == 3:
  table.append("| sampling | | failed: see sample.txt | | | |")
with open(os.path.join(out, "parts.txt")) as f:  # local file: this script's own output
  parts = f.read().strip().replace("\n", "; ")
sections = [f"# GPU suite ({size})", "", f"Parts: {parts}.", ""] + table
for name in ("train.txt", "sample.txt"):
  with open(os.path.join(out, name)) as f:  # local file: this script's own output
    sections += ["", f"## {name}", "", "```", f.read().strip()[-6000:], "```"]
with open(os.path.join(out, "gpu_suite.md"), "w") as f:  # local file: this script's own output
  f.write("\n".join(sections) + "\n")
print("\n".join(table))
EOF
