#!/usr/bin/env bash
# Mutation testing with mutmut (configured in pyproject.toml, [tool.mutmut]), one module at a time.
#
#   tools/mutation.sh                                   every module of [tool.mutmut] only_mutate
#   tools/mutation.sh megatron_ssm.inference.sampling   just these (dotted names)
#   tools/mutation.sh 'megatron_ssm.inference.engine.xǁEngineǁ_admit*'   some functions (mutmut's names)
#   KEEP=1 tools/mutation.sh ...                        reuse mutants/ from an earlier run
#   MAX_CHILDREN=1 tools/mutation.sh ...                mutants run at once (default: one per core)
#
# Each mutant runs only the single-process tests that reach the mutated function (conftest.py drops
# rank-pool and interpreter tests under MEGATRON_SSM_MUTATION=1), so one costs about a second.
# Prints "module: killed/total = score" per module (timeouts count as killed; "no tests" and
# survivors as not); `python -m mutmut show NAME` prints a mutant's diff. docs/testing.md has the scores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PER_MODULE_TIMEOUT=${PER_MODULE_TIMEOUT:-3600}
export MEGATRON_SSM_MUTATION=1
unset PYTHONPATH  # mutmut puts mutants/ first; a PYTHONPATH to the source would shadow it

if [ $# -eq 0 ]; then
    set -- $("$PY" -c 'import tomllib; print(" ".join(p.removesuffix(".py").replace("/", ".") for p in
        tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"]["only_mutate"]))')
fi
[ -n "${KEEP:-}" ] || rm -rf mutants
mkdir -p out/mutation

modules=()
for target in "$@"; do
    # a module (every mutant of it) or a mutmut name pattern (some functions' mutants)
    case "$target" in *'*'*) pattern=$target ;; *) pattern="$target.*" ;; esac
    module=$(printf '%s' "$target" | sed -E 's/\.x(_|ǁ).*//')
    modules+=("$module")
    log="out/mutation/$(printf '%s' "$target" | tr -c 'A-Za-z0-9._-' '_').log"
    timeout "$PER_MODULE_TIMEOUT" "$PY" -m mutmut run --max-children "${MAX_CHILDREN:-$(nproc)}" "$pattern" > "$log" 2>&1 \
        || echo "$target: mutmut exited $? (log: $log)"
done
set -- $(printf '%s\n' "${modules[@]}" | sort -u)
"$PY" -m mutmut results --all true 2>/dev/null | "$PY" -c '
import collections, re, sys
wanted = sys.argv[1:]
counts = collections.defaultdict(collections.Counter)
for line in sys.stdin:
    m = re.match(r"\s*(.+?)\.x[_\u01c1].*: (.+)$", line)
    if m and m.group(1) in wanted:
        counts[m.group(1)][m.group(2).strip()] += 1
for module in wanted:
    c = counts[module]
    killed = c["killed"] + c["timeout"]
    total = sum(c.values()) - c["not checked"]
    score = f"{killed / total:.1%}" if total else "-"
    rest = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("killed", "timeout"))
    print(f"{module}: {killed}/{total} = {score}  ({rest})")
' "$@"
