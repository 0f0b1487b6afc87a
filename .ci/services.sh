# Start the services the cluster tests use, as a user's CI would: Debian's PostgreSQL (role + databases) and an
# MLflow tracking server on it with proxied artifacts. Source it (`. .ci/services.sh`): it exports
#   ILLADA_TEST_PG_URL      postgresql+psycopg://illada:...@127.0.0.1:5432/illada_optuna   (Optuna storage)
#   ILLADA_TEST_PG_MLFLOW   the same server's database for MLflow (tests start servers of their own on it)
#   ILLADA_TEST_MLFLOW_URI  http://127.0.0.1:<port>                                          (tracking server)
# and installs a trap that stops the MLflow server (by its process group's PID) and PostgreSQL (if this script started it) on exit.
# Needs root for pg_ctlcluster (the CI machine's user); on a machine without PostgreSQL it installs Debian's.

ILLADA_PG_PASSWORD=${ILLADA_PG_PASSWORD:-illada-ci}
ILLADA_MLFLOW_PORT=${ILLADA_MLFLOW_PORT:-5055}
_services_dir=$(mktemp -d /tmp/illada-services.XXXXXX)

if ! command -v pg_ctlcluster >/dev/null; then
  apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null
fi
_pg_version=$(ls /usr/lib/postgresql | sort -n | tail -1)
_pg_started=0
if ! pg_lsclusters -h | awk -v v="$_pg_version" '$1==v && $2=="main" {print $4}' | grep -q online; then
  pg_ctlcluster --skip-systemctl-redirect "$_pg_version" main start
  _pg_started=1
fi
_psql() { su postgres -c "psql -v ON_ERROR_STOP=1 -qAt -c \"$1\""; }
if [ "$(_psql "SELECT 1 FROM pg_roles WHERE rolname='illada'")" != "1" ]; then
  _psql "CREATE ROLE illada LOGIN PASSWORD '$ILLADA_PG_PASSWORD'"
fi
_psql "ALTER ROLE illada CREATEDB PASSWORD '$ILLADA_PG_PASSWORD'"  # tests make a database of their own each
for _db in illada_optuna illada_mlflow; do
  if [ "$(_psql "SELECT 1 FROM pg_database WHERE datname='$_db'")" != "1" ]; then
    _psql "CREATE DATABASE $_db OWNER illada"
  fi
done
export ILLADA_TEST_PG_URL="postgresql+psycopg://illada:$ILLADA_PG_PASSWORD@127.0.0.1:5432/illada_optuna"
export ILLADA_TEST_PG_MLFLOW="postgresql+psycopg://illada:$ILLADA_PG_PASSWORD@127.0.0.1:5432/illada_mlflow"
export ILLADA_TEST_PG_CLUSTER="$_pg_version main"  # the fault drill restarts it (pg_ctlcluster ... restart)

# In a session of its own (setsid), so that stopping it stops its web workers too; without MLflow's GenAI job
# runners (seven more processes that tracking does not use).
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --backend-store-uri "$ILLADA_TEST_PG_MLFLOW" \
  --artifacts-destination "file://$_services_dir/artifacts" --host 127.0.0.1 --port "$ILLADA_MLFLOW_PORT" \
  --workers 1 >"$_services_dir/mlflow.log" 2>&1 &
_mlflow_pid=$!
export ILLADA_TEST_MLFLOW_URI="http://127.0.0.1:$ILLADA_MLFLOW_PORT"

_stop_services() {
  kill -- "-$_mlflow_pid" 2>/dev/null && wait "$_mlflow_pid" 2>/dev/null
  if [ "$_pg_started" = 1 ]; then pg_ctlcluster --skip-systemctl-redirect $ILLADA_TEST_PG_CLUSTER stop; fi
  rm -rf "$_services_dir"
}
trap _stop_services EXIT

for _ in $(seq 120); do
  if python -c "import urllib.request as u; u.urlopen('$ILLADA_TEST_MLFLOW_URI/health', timeout=2)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$_mlflow_pid" 2>/dev/null; then cat "$_services_dir/mlflow.log" >&2; exit 1; fi
  sleep 1
done
echo "services: PostgreSQL $ILLADA_TEST_PG_CLUSTER on 127.0.0.1:5432, MLflow server $ILLADA_TEST_MLFLOW_URI (pid $_mlflow_pid)"
