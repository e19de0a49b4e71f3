#!/usr/bin/env bash
# Time `make demo` as a newcomer runs it: a fresh clone of this repository's HEAD in a temporary folder, the venv
# built there (scripts/setup_venv.sh), then the demo; append the times, the machine's load and the summary.json
# numbers to docs/demo_results.md (issue 22: under 8 minutes in total on the 2-core machine, also with a busy core).
#
#   scripts/time_demo.sh                 # one run
#   scripts/time_demo.sh --busy-core     # with `yes > /dev/null` pinned to core 0 the whole time
#   scripts/time_demo.sh --runs 3 --keep # three runs one after another; keep the temporary clones
#   RESULTS=/tmp/x.md scripts/time_demo.sh   # append elsewhere
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=${RESULTS:-$REPO/docs/demo_results.md}
busy=0 runs=1 keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --busy-core) busy=1 ;;
        --runs) runs=$2; shift ;;
        --keep) keep=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "time_demo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ "$busy" = 0 ] || command -v taskset > /dev/null || { echo "time_demo.sh: --busy-core needs taskset (util-linux)" >&2; exit 2; }

busy_pid=
stop_busy() { [ -z "$busy_pid" ] || kill "$busy_pid" 2> /dev/null || true; busy_pid=; }
trap stop_busy EXIT

for i in $(seq "$runs"); do
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/vavae_demo_XXXXXX")
    git clone -q "$REPO" "$tmp/clone"
    commit=$(git -C "$tmp/clone" rev-parse --short HEAD)
    if [ "$busy" = 1 ]; then
        taskset -c 0 yes > /dev/null &
        busy_pid=$!
    fi
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    t0=$(date +%s.%N)
    rc=0
    (cd "$tmp/clone" && make venv) > "$tmp/venv.log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    [ "$rc" != 0 ] || (cd "$tmp/clone" && make demo) > "$tmp/demo.log" 2>&1 || rc=$?
    t2=$(date +%s.%N)
    load_after=$(cut -d' ' -f1-3 /proc/loadavg)
    stop_busy
    if [ "$rc" != 0 ]; then
        echo "time_demo.sh: run $i failed (exit $rc); logs in $tmp" >&2
        tail -5 "$tmp/venv.log" "$tmp/demo.log" 2> /dev/null >&2 || true
        exit 1
    fi
    python3 - "$tmp/clone/runs/demo/summary.json" "$RESULTS" "$commit" "$busy" "$load_before" "$load_after" \
        "$t0" "$t1" "$t2" << 'EOF'
import json, os, sys
from datetime import datetime, timezone
summary, results, commit, busy, load_before, load_after, t0, t1, t2 = sys.argv[1:]
s = json.load(open(summary))
venv, demo = float(t1) - float(t0), float(t2) - float(t1)
mmss = lambda x: f"{int(x // 60)} min {x % 60:04.1f} s"
h = s["headline"]
pick = lambda prefix: next(v for k, v in h.items() if k.startswith(prefix))
row = (f"| {datetime.now(timezone.utc):%Y-%m-%d %H:%M} | {commit} | {s['machine']['cpu']}, {s['machine']['cores']} cores "
       f"| {'1 core busy' if busy == '1' else 'no other job started'} | {load_before} / {load_after} "
       f"| {s['threads']['intra_op']} | {venv:.0f} s | {mmss(demo)} | **{mmss(venv + demo)}** "
       f"| {', '.join(f'{k} {v:g}' for k, v in s['stage_seconds'].items())} "
       f"| {pick('classifier accuracy on generated samples')} | {pick('classifier accuracy on VA-VAE reconstructions')} "
       f"| {pick('classifier accuracy on held-out real images')} | {pick('classifier FD')} | {h['VA-VAE PSNR / SSIM']} |")
header = ("| date (UTC) | commit | machine | other load | load avg before / after | threads | venv | make demo "
          "| total | stage seconds | samples acc | reconstructions acc | held-out real acc | classifier FD "
          "| PSNR / SSIM |\n" + "|---" * 15 + "|\n")
if not os.path.exists(results):
    open(results, "w").write("# make demo: timed fresh-clone runs\n\n")
text = open(results).read()
if "## Timed fresh-clone runs (scripts/time_demo.sh)" not in text:
    text += "\n## Timed fresh-clone runs (scripts/time_demo.sh)\n\n" + header
elif not text.rstrip().endswith("|"):
    text += "\n" + header
open(results, "w").write(text.rstrip("\n") + "\n" + row + "\n")
print(row)
EOF
    [ "$keep" = 1 ] && echo "kept $tmp" || rm -rf "$tmp"
done
