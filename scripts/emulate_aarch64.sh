#!/usr/bin/env bash
# Run the edge client as on a Raspberry Pi: aarch64 user-mode emulation (Debian's qemu-user-static +
# binfmt_misc) in a Debian arm64 root made with debootstrap, against splitinfer-serve on this host's
# loopback, over PNGs of the demo's test canvases. Prints the edge's summary on the host and under
# emulation, the accuracy of both, and the time per input under emulation.
#
#   sudo scripts/emulate_aarch64.sh                  # 300 canvases, Pi 4 CPU (cortex-a72)
#   N=100 QEMU_CPU=cortex-a76 sudo -E scripts/emulate_aarch64.sh     # Pi 5 CPU
#
# Needs root (debootstrap, chroot, mounts) and Debian's package mirrors; the first run spends a few
# minutes in debootstrap, later runs reuse the root in $EMU_DIR. Not part of `make test` (slow).
# Settings (environment): EMU_DIR (/var/tmp/splitinfer-emu), N (300), QEMU_CPU (cortex-a72),
# MODEL (a model folder; default: the committed checkpoint exported with --quantize int8 into
# $EMU_DIR/model), DEVICE_HALF (auto), SUITE (bookworm), PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

EMU_DIR=${EMU_DIR:-/var/tmp/splitinfer-emu}
ROOTFS=$EMU_DIR/root
N=${N:-300}
QEMU_CPU=${QEMU_CPU:-cortex-a72}
DEVICE_HALF=${DEVICE_HALF:-auto}
SUITE=${SUITE:-bookworm}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
BIN=$(dirname "$PYTHON")
MODEL=${MODEL:-$EMU_DIR/model}
GUEST=/opt/splitinfer

log() { echo "== $*" >&2; }
[ "$(id -u)" = 0 ] || { echo "emulate_aarch64.sh: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
[ -x "$PYTHON" ] || { echo "emulate_aarch64.sh: $PYTHON not found: run 'make setup' first" >&2; exit 2; }
mkdir -p "$EMU_DIR"

# 1. qemu-user-static and debootstrap from Debian's packages.
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing qemu-user-static and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap
fi

# 2. binfmt_misc, mounted and registered by hand (no systemd here). Debian's entry has the F flag,
#    so the interpreter is opened now and works inside the chroot too.
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -f "$conf" ] || { echo "emulate_aarch64.sh: $conf missing (qemu-user-static)" >&2; exit 1; }
    cat "$conf" > /proc/sys/fs/binfmt_misc/register
fi

# 3. The Debian arm64 root (Python 3.11, glibc 2.36: manylinux_2_28 wheels, as on Raspberry Pi OS bookworm).
if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    log "debootstrap --arch=arm64 $SUITE into $ROOTFS (several minutes)"
    rm -rf "$ROOTFS"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$ROOTFS" ${MIRROR:+"$MIRROR"} > "$EMU_DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$EMU_DIR/debootstrap.log" >&2; exit 1; }
fi

# 4. On the host: the model folder, the test PNGs, and aarch64 wheels (pip inside the root cannot
#    verify the registry's TLS, so it installs offline from these).
if [ ! -f "$MODEL/manifest.json" ] || { [ "$MODEL" = "$EMU_DIR/model" ] && [ checkpoints/vit-cluttered-mnist.pt -nt "$MODEL/manifest.json" ]; }; then
    log "exporting the committed checkpoint (with an INT8 device half) into $MODEL"
    "$BIN/splitinfer-export" export --checkpoint checkpoints/vit-cluttered-mnist.pt --out "$MODEL" \
        --quantize int8 > "$EMU_DIR/export.json"
fi
"$PYTHON" scripts/canvases.py write --n "$N" --out "$EMU_DIR/pngs" >&2
rm -rf "$EMU_DIR/wheels"
log "downloading aarch64 wheels (manylinux_2_28, cp311)"
"$PYTHON" scripts/aarch64_wheels.py download --glibc manylinux_2_28 --python 3.11 --dest "$EMU_DIR/wheels" >&2
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$EMU_DIR/wheels" . >&2

# 5. Mounts: /proc with a Pi-like cpuinfo over it (onnxruntime's CPU detection crashes on the host's
#    x86 cpuinfo), /dev for the venv and pip. Undone on exit. /sys stays unmounted; the two files of
#    it that the CPU detection needs are plain files in the root (without them it gives up and
#    onnxruntime warns of "undetected CPU features").
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    umount "$ROOTFS/proc/cpuinfo" 2>/dev/null || true
    umount "$ROOTFS/proc" 2>/dev/null || true
    umount "$ROOTFS/dev" 2>/dev/null || true
}
trap cleanup EXIT
case "$QEMU_CPU" in
    cortex-a76) part=0xd0b; model="Raspberry Pi 5 Model B Rev 1.0"; hw=BCM2712
                features="fp asimd evtstrm crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
    *)          part=0xd08; model="Raspberry Pi 4 Model B Rev 1.4"; hw=BCM2835
                features="fp asimd evtstrm crc32 cpuid" ;;
esac
{
    for i in 0 1 2 3; do
        printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
        printf 'CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: 3\n\n' "$part"
    done
    printf 'Hardware\t: %s\nRevision\t: c03114\nSerial\t\t: 100000000000abcd\nModel\t\t: %s\n' "$hw" "$model"
} > "$EMU_DIR/cpuinfo"
mkdir -p "$ROOTFS/sys/devices/system/cpu"
echo 0-3 > "$ROOTFS/sys/devices/system/cpu/possible"
echo 0-3 > "$ROOTFS/sys/devices/system/cpu/present"
mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"
mount --bind "$EMU_DIR/cpuinfo" "$ROOTFS/proc/cpuinfo"
mountpoint -q "$ROOTFS/dev" || mount --bind /dev "$ROOTFS/dev"

CHROOT=$(command -v chroot)
guest() {  # a command in the arm64 root, with a clean environment (no host pip settings)
    env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU" "$CHROOT" "$ROOTFS" "$@"
}

# 6. Inside: a venv with splitinfer[edge] from the downloaded wheels only.
rm -rf "$ROOTFS$GUEST"/{model,pngs,wheels}
mkdir -p "$ROOTFS$GUEST"
cp -r "$MODEL" "$ROOTFS$GUEST/model"
cp -r "$EMU_DIR/pngs" "$EMU_DIR/wheels" "$ROOTFS$GUEST/"
[ -x "$ROOTFS$GUEST/venv/bin/python" ] || { log "creating the guest venv"; guest python3 -m venv "$GUEST/venv"; }
log "installing splitinfer[edge] in the guest (offline)"
guest "$GUEST/venv/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$GUEST/wheels" \
    --force-reinstall "splitinfer[edge]" >&2
guest "$GUEST/venv/bin/python" -c "import platform, onnxruntime, numpy; print('guest:', platform.machine(), \
'python', platform.python_version(), 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"

# 7. The server on the host's loopback.
"$BIN/splitinfer-serve" --model "$MODEL" --host 127.0.0.1 --port 0 > "$EMU_DIR/serve.out" 2> "$EMU_DIR/serve.err" &
SERVER_PID=$!
for _ in $(seq 1 300); do
    grep -q "listening on" "$EMU_DIR/serve.out" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$EMU_DIR/serve.err" >&2; exit 1; }
    sleep 0.1
done
ADDRESS=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$EMU_DIR/serve.out" | head -1)
[ -n "$ADDRESS" ] || { echo "emulate_aarch64.sh: the server did not start" >&2; cat "$EMU_DIR/serve.err" >&2; exit 1; }
log "server on $ADDRESS"

# 8. The same command on the host and under emulation.
log "host ($(uname -m))"
"$BIN/splitinfer-edge" classify --model "$MODEL" --server "$ADDRESS" --device-half "$DEVICE_HALF" -v --json "$EMU_DIR/pngs" \
    > "$EMU_DIR/host.jsonl" 2> "$EMU_DIR/host.summary"
grep -v "^INFO splitinfer.edge.runner" "$EMU_DIR/host.summary"
log "emulated aarch64 (QEMU_CPU=$QEMU_CPU)"
t0=$(date +%s.%N)
guest "$GUEST/venv/bin/splitinfer-edge" classify --model "$GUEST/model" --server "$ADDRESS" --device-half "$DEVICE_HALF" -v \
    --json "$GUEST/pngs" > "$EMU_DIR/emulated.jsonl" 2> "$EMU_DIR/emulated.summary"
t1=$(date +%s.%N)
grep -v "^INFO splitinfer.edge.runner" "$EMU_DIR/emulated.summary"
"$PYTHON" - "$t0" "$t1" "$N" <<'EOF'
import sys
t0, t1, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
print(f"emulated run: {t1 - t0:.1f} s wall for {n} inputs, {1e3 * (t1 - t0) / n:.1f} ms per input "
      "(process start and model load included)")
EOF
"$PYTHON" scripts/canvases.py score --labels "$EMU_DIR/pngs/labels.csv" "$EMU_DIR/host.jsonl" "$EMU_DIR/emulated.jsonl"
