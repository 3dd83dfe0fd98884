#!/usr/bin/env bash
# Start etcd + the cached kube-apiserver on free loopback ports, exercise it
# with curl (version, readyz, namespace, batch/v1 Job, server-side dry run),
# then stop everything it started.
#
# Usage: k8s/testenv/smoke-apiserver.sh [K8S_VERSION]
#   ETCD_BIN=/usr/bin/etcd (default: $K8S_BIN_CACHE/etcd/etcd if present, else `command -v etcd`)
#   KEEP_TMP=1 keeps the temp dir (logs) for inspection
#   WITH_KCM=1 also starts the cached kube-controller-manager and waits for the
#              Job controller to create the Job's Pod (default: 1 if built)
set -euo pipefail

K8S_VERSION="${1:-${K8S_VERSION:-v1.37.2}}"
CACHE="${K8S_BIN_CACHE:-$HOME/.cache/image-pipeline/k8s}"
APISERVER="$CACHE/$K8S_VERSION/kube-apiserver"
if [[ -z "${ETCD_BIN:-}" ]]; then
  if [[ -x "$CACHE/etcd/etcd" ]]; then ETCD_BIN="$CACHE/etcd/etcd"; else ETCD_BIN="$(command -v etcd)"; fi
fi
KCM="$CACHE/$K8S_VERSION/kube-controller-manager"
if [[ -z "${WITH_KCM:-}" ]]; then [[ -x "$KCM" ]] && WITH_KCM=1 || WITH_KCM=0; fi
[[ -x "$APISERVER" ]] || { echo "no $APISERVER; run build-apiserver.sh $K8S_VERSION" >&2; exit 1; }

# Owner-only from the first byte: the folder gets the signing key, the token file and a
# kubeconfig with the admin token.
umask 077
TMP="$(mktemp -d /tmp/k8s-smoke.XXXXXX)"
PIDS=()
stop() { # stop <pid>: SIGTERM, then SIGKILL after 20s
  local p=$1
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$p" 2>/dev/null; then echo "pid $p ignored SIGTERM for 20s, SIGKILL" >&2; kill -9 "$p" 2>/dev/null || true; fi
  wait "$p" 2>/dev/null || true
}
cleanup() {
  trap - EXIT INT TERM
  # reverse order: kube-apiserver BEFORE etcd -- with etcd gone first, the
  # apiserver's graceful shutdown hangs for minutes retrying etcd.
  local i t0
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do
    t0=$(date +%s.%N); stop "${PIDS[i]}"
    echo ">> stopped pid ${PIDS[i]} in $(python3 -c "import time;print(round(time.time()-$t0,1))")s"
  done
  if [[ -z "${KEEP_TMP:-}" ]]; then rm -rf "$TMP"; else echo "kept $TMP"; fi
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1]);s.close()'; }
ETCD_CLIENT=$(free_port); ETCD_PEER=$(free_port); API_PORT=$(free_port); KCM_PORT=$(free_port)

echo ">> etcd: $("$ETCD_BIN" --version | head -1) on 127.0.0.1:$ETCD_CLIENT"
"$ETCD_BIN" --name smoke --data-dir "$TMP/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "smoke=http://127.0.0.1:$ETCD_PEER" >"$TMP/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$ETCD_CLIENT/health" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "http://127.0.0.1:$ETCD_CLIENT/version"; echo

openssl genrsa -out "$TMP/sa.key" 2048 2>/dev/null
openssl rsa -in "$TMP/sa.key" -pubout -out "$TMP/sa.pub" 2>/dev/null
TOKEN="$(openssl rand -hex 16)"
echo "$TOKEN,admin,admin-uid,system:masters" > "$TMP/tokens.csv"

FLAGS=(
  --etcd-servers="http://127.0.0.1:$ETCD_CLIENT"
  --bind-address=127.0.0.1
  --secure-port="$API_PORT"
  --cert-dir="$TMP/certs"
  --authorization-mode=Node,RBAC
  --token-auth-file="$TMP/tokens.csv"
  --service-account-key-file="$TMP/sa.pub"
  --service-account-signing-key-file="$TMP/sa.key"
  --service-account-issuer=https://kubernetes.default.svc.cluster.local
  --service-cluster-ip-range=10.0.0.0/24
)
echo ">> kube-apiserver $("$APISERVER" --version) on https://127.0.0.1:$API_PORT"
printf '   %s\n' "${FLAGS[@]}"
START=$(date +%s.%N)
"$APISERVER" "${FLAGS[@]}" >"$TMP/apiserver.log" 2>&1 &
PIDS+=($!)
APID=$!

API="https://127.0.0.1:$API_PORT"
k() { curl -ksS -H "Authorization: Bearer $TOKEN" "$@"; }
ready=""
for _ in $(seq 240); do
  if ! kill -0 "$APID" 2>/dev/null; then echo "kube-apiserver exited:" >&2; tail -40 "$TMP/apiserver.log" >&2; exit 1; fi
  if [[ "$(k -o /dev/null -w '%{http_code}' "$API/readyz" 2>/dev/null)" == 200 ]]; then ready=1; break; fi
  sleep 0.5
done
if [[ -z "$ready" ]]; then echo "not ready after 120s" >&2; k "$API/readyz?verbose" >&2 || true; tail -40 "$TMP/apiserver.log" >&2; exit 1; fi
echo ">> ready after $(python3 -c "import time;print(round(time.time()-$START,1))")s"

echo ">> GET /version";  k "$API/version"; echo
echo ">> GET /readyz";   k "$API/readyz"; echo
echo ">> GET /livez";    k "$API/livez"; echo
echo ">> anonymous GET /api/v1/namespaces (expect 401/403)"; curl -ksS -o /dev/null -w '%{http_code}\n' "$API/api/v1/namespaces"

code() { local out; out=$(k -o "$TMP/resp.json" -w '%{http_code}' "$@"); echo "$out"; }
expect() { # expect <want-code> <desc> curl-args...
  local want=$1 desc=$2; shift 2
  local got; got=$(code "$@")
  echo "   $desc -> HTTP $got"
  if [[ "$got" != "$want" ]]; then echo "FAIL: wanted $want" >&2; cat "$TMP/resp.json" >&2; exit 1; fi
}

NS=smoke
JOB='{"apiVersion":"batch/v1","kind":"Job","metadata":{"name":"hello"},
 "spec":{"backoffLimit":0,"template":{"spec":{"restartPolicy":"Never",
 "containers":[{"name":"c","image":"busybox:1.36","command":["true"]}]}}}}'
echo ">> create namespace + job"
expect 201 "POST namespace $NS" -X POST -H 'Content-Type: application/json' \
  -d "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$NS\"}}" "$API/api/v1/namespaces"
expect 201 "POST job hello" -X POST -H 'Content-Type: application/json' -d "$JOB" \
  "$API/apis/batch/v1/namespaces/$NS/jobs"
python3 -c 'import json,sys;d=json.load(open(sys.argv[1]));print("   uid",d["metadata"]["uid"],"selector",d["spec"]["selector"])' "$TMP/resp.json"
expect 200 "GET job hello" "$API/apis/batch/v1/namespaces/$NS/jobs/hello"

echo ">> server-side dry run"
expect 201 "POST job dry?dryRun=All" -X POST -H 'Content-Type: application/json' \
  -d "${JOB/\"hello\"/\"dry\"}" "$API/apis/batch/v1/namespaces/$NS/jobs?dryRun=All"
expect 404 "GET job dry (must not exist)" "$API/apis/batch/v1/namespaces/$NS/jobs/dry"
expect 422 "POST invalid job dryRun=All (no containers)" -X POST -H 'Content-Type: application/json' \
  -d '{"apiVersion":"batch/v1","kind":"Job","metadata":{"name":"bad"},"spec":{"template":{"spec":{"restartPolicy":"Never","containers":[]}}}}' \
  "$API/apis/batch/v1/namespaces/$NS/jobs?dryRun=All"
python3 -c 'import json,sys;d=json.load(open(sys.argv[1]));print("   ",d.get("message","")[:160])' "$TMP/resp.json"
if [[ "$WITH_KCM" == 1 ]]; then
  cat > "$TMP/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: smoke, cluster: {server: "$API", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: "$TOKEN"}}]
contexts: [{name: smoke, context: {cluster: smoke, user: admin}}]
current-context: smoke
KC
  KCM_FLAGS=(
    --kubeconfig="$TMP/kubeconfig"
    --bind-address=127.0.0.1
    --secure-port="$KCM_PORT"
    --leader-elect=false
    --service-account-private-key-file="$TMP/sa.key"
    --use-service-account-credentials=false
    --controllers=*
    --flex-volume-plugin-dir="$TMP/flexvolume"   # default /usr/libexec/kubernetes/... gets mkdir'ed otherwise
  )
  echo ">> kube-controller-manager $("$KCM" --version)"
  printf '   %s\n' "${KCM_FLAGS[@]}"
  "$KCM" "${KCM_FLAGS[@]}" >"$TMP/kcm.log" 2>&1 &
  PIDS+=($!)
  KPID=$!
  pod=""
  for _ in $(seq 120); do
    kill -0 "$KPID" 2>/dev/null || { echo "kube-controller-manager exited:" >&2; tail -30 "$TMP/kcm.log" >&2; exit 1; }
    pod=$(k "$API/api/v1/namespaces/$NS/pods?labelSelector=batch.kubernetes.io/job-name%3Dhello" \
      | python3 -c 'import json,sys;print(" ".join(i["metadata"]["name"]+"("+i["status"].get("phase","?")+")" for i in json.load(sys.stdin)["items"]))')
    [[ -n "$pod" ]] && break
    sleep 0.5
  done
  [[ -n "$pod" ]] || { echo "FAIL: job controller created no pod in 60s" >&2; tail -30 "$TMP/kcm.log" >&2; exit 1; }
  echo "   job controller created pod: $pod (Pending forever: no scheduler/kubelet)"
  echo "   serviceaccounts in $NS: $(k "$API/api/v1/namespaces/$NS/serviceaccounts" | python3 -c 'import json,sys;print([i["metadata"]["name"] for i in json.load(sys.stdin)["items"]])')"
fi
echo ">> jobs in $NS:"; k "$API/apis/batch/v1/namespaces/$NS/jobs" | python3 -c 'import json,sys;print("  ",[i["metadata"]["name"] for i in json.load(sys.stdin)["items"]])'
echo ">> warnings/errors in apiserver log mentioning etcd:"; grep -iE 'etcd.*(version|unsupported|progress)' "$TMP/apiserver.log" | head -5 || true
echo "SMOKE OK"
