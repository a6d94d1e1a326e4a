#!/usr/bin/env bash
# Look at a study in the MLflow UI as a person would, without a display:
#   scripts/mlflow_ui_screenshot.sh runs/quickstart [out_dir] [port]
# starts `studyctl ui` on 127.0.0.1, opens the run-comparison page of the study's trial runs
# (and the experiment's run table) in headless Chromium, writes PNG screenshots, stops the UI.
# Needs Debian's chromium (apt-get install chromium).
set -euo pipefail
study="${1:?usage: $0 STUDY_DIR [OUT_DIR] [PORT]}"
out="${2:-$study/screenshots}"
port="${3:-5055}"
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
study="$(cd "$study" && pwd)"
mkdir -p "$out"
browser="$(command -v chromium || command -v chromium-browser || true)"
[ -n "$browser" ] || { echo "chromium not found: apt-get install chromium" >&2; exit 2; }

setsid "$py" -m orchestrator.cli ui "$study" --port "$port" > "$out/ui.log" 2>&1 &
ui_pid=$!
echo "MLflow UI: pid $ui_pid, process group $(ps -o pgid= -p "$ui_pid" | tr -d " ")" >&2
trap 'kill -TERM -- -"$ui_pid" 2>/dev/null || true; sleep 2; kill -KILL -- -"$ui_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/health" > /dev/null 2>&1 && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$port/health" > /dev/null || { echo "MLflow UI did not start:"; cat "$out/ui.log"; exit 1; }

# The experiment and its trial (child) runs, from the study's own store.
read -r exp runs < <("$py" - "$study" <<'PY'
import json, sys, urllib.parse, yaml
from pathlib import Path
from mlflow.tracking import MlflowClient
from orchestrator.tracking import tracking_uri
d = Path(sys.argv[1])
snap = yaml.safe_load((d / "study.yaml").read_text())
c = MlflowClient(tracking_uri(snap.get("tracking", {}).get("uri"), d))
exp = c.get_experiment_by_name(snap["tracking"].get("experiment") or snap["name"])
runs = [r.info.run_id for r in c.search_runs([exp.experiment_id], "tags.`studyctl.role` = 'trial'")]
print(exp.experiment_id, urllib.parse.quote(json.dumps(runs)))
PY
)
shoot() {  # url file
  "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --hide-scrollbars --window-size=1600,1400 --virtual-time-budget=20000 \
    --screenshot="$2" "$1" > /dev/null 2>&1
  echo "wrote $2"
}
base="http://127.0.0.1:$port/#"
shoot "$base/compare-runs?runs=$runs&experiments=$(printf '%%5B%%22%s%%22%%5D' "$exp")" "$out/compare_runs.png"
shoot "$base/experiments/$exp/runs" "$out/experiment_runs.png"
shoot "$base/experiments/$exp/runs/$("$py" -c "import json,sys,urllib.parse;print(json.loads(urllib.parse.unquote(sys.argv[1]))[0])" "$runs")" "$out/trial_run.png"
