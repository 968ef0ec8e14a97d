#!/usr/bin/env bash
# Count the primes in slice $1 (0-based) of $SLICE numbers; called by jobs/commands.txt.
# Prints one line: "slice I [LO, HI]: N primes".
set -euo pipefail
slice=$1
lo=$(( slice * SLICE ))
hi=$(( lo + SLICE - 1 ))
# factor prints "n: p" for a prime n (two fields); 0 and 1 print "n:" alone
count=$(seq "$lo" "$hi" | factor | awk 'NF == 2 { n++ } END { print n + 0 }')
echo "slice $slice [$lo, $hi]: $count primes (task $TASKFARM_TASK_INDEX, attempt $TASKFARM_ATTEMPT)"
