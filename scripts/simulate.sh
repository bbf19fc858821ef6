#!/usr/bin/env bash
# A campaign of the deterministic simulation (tests/tests/simulation.rs): the whole
# three-node cluster in one process on turmoil's network and clock, seeded faults, a
# history checker. Runs unattended; prints one line per seed and the failing seeds.
# Long seeds by default (20 s of faults; CI's `cargo test` runs 500 seeds of 4 s), one
# process per seed, as many at once as there are cores (--jobs to change).
#
#   scripts/simulate.sh --seeds 1000                 # seeds 1..1000, 20 s of faults each
#   scripts/simulate.sh --seeds 2000 --seconds 4     # short seeds, as CI runs them
#   scripts/simulate.sh --seeds 500 --first 7000 --seconds 40
#   scripts/simulate.sh --seeds 200 --nodes 5        # five-node clusters
#   scripts/simulate.sh --seed 1234                  # replay one seed
#   scripts/simulate.sh --seed 1234 --twice          # run it twice, compare the traces
#   SIM_TRACE=openraft=debug,broker_node=debug SIM_TRACE_OUT=/tmp/tr \
#     scripts/simulate.sh --seed 1234 --twice        # with the nodes' logs, both kept
#   SIM_LOG=broker_node=info scripts/simulate.sh --seed 1234   # and the nodes' logs
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS=100 FIRST=1 SECONDS_FAULTY=20 ONE="" NODES=3 TEST=seeds_of_faults_keep_every_guarantee
JOBS=${SIM_JOBS:-$(nproc)}
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) SEEDS=$2; shift 2 ;;
    --first) FIRST=$2; shift 2 ;;
    --seconds) SECONDS_FAULTY=$2; shift 2 ;;
    --seed) ONE=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --twice) TEST=a_seed_replays_the_same_run; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

export SIM_SECONDS=$SECONDS_FAULTY SIM_NODES=$NODES SIM_JOBS=$JOBS SIM_EACH=1
if [ -n "$ONE" ]; then
  export SIM_SEED=$ONE
else
  export SIM_SEEDS=$SEEDS SIM_FIRST_SEED=$FIRST
fi
exec cargo test -q -p flockmq-tests --test simulation -- --nocapture --exact "$TEST"
