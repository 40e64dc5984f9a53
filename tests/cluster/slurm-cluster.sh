#!/usr/bin/env bash
# A real single-node Slurm cluster with accounting (slurmctld, slurmd, slurmdbd + MariaDB, munge) on this
# machine, for the tests. Needs root; installs Debian's Slurm packages when missing.
#   slurm-cluster.sh start DIR   → writes DIR/slurm.conf; export SLURM_CONF=DIR/slurm.conf to use the cluster
#   slurm-cluster.sh stop DIR    → stops every daemon it started (the pid files in DIR/run)
set -euo pipefail
cmd=${1:?usage: slurm-cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: slurm-cluster.sh start|stop DIR}")
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
DB_PORT=${SLURM_TEST_DB_PORT:-3307}
export SLURM_CONF=$dir/slurm.conf

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND…
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "slurm-cluster: $what did not come up in ${limit}s; logs in $dir/log" >&2
  return 1
}

start() {
  [ "$(id -u)" = 0 ] || { echo "slurm-cluster: needs root" >&2; exit 1; }
  local missing=""
  for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing+="$p "; done
  if [ -n "$missing" ]; then
    echo "slurm-cluster: installing $missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  mkdir -p "$dir"/{state,spool,log,run}
  local host
  host=$(hostname -s)
  getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >>/etc/hosts

  # munge: shared by every daemon and client
  if ! munge -n </dev/null >/dev/null 2>&1; then
    [ -f /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
    mkdir -p /run/munge && chown munge:munge /run/munge
    pkill -x munged && sleep 0.5 || true
    runuser -u munge -- /usr/sbin/munged
    touch "$dir/run/started-munged"
    wait_for 10 munged sh -c "munge -n </dev/null"
  fi

  # MariaDB for slurmdbd, in a private data directory on its own port. The mysql user must reach it, and the
  # caller's directory may be private (pytest's are 0700), so it lives in its own directory under /tmp.
  local db
  db=$(mktemp -d /tmp/slurm-test-mariadb.XXXXXX)
  echo "$db" >"$dir/run/mariadb-dir"
  chown mysql:mysql "$db"
  mariadb-install-db --user=mysql --datadir="$db/data" --auth-root-authentication-method=socket >"$dir/log/mariadb-install.log" 2>&1
  mariadbd --user=mysql --datadir="$db/data" --socket="$db/mysqld.sock" --pid-file="$db/mariadbd.pid" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --log-error="$db/mariadbd.log" >/dev/null 2>&1 &
  wait_for 30 MariaDB mariadb --socket="$db/mysqld.sock" -e "select 1"
  mariadb --socket="$db/mysqld.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

  local node
  node=$(slurmd -C | head -1)
  local mem=${node##*RealMemory=}
  node="${node% RealMemory=*} RealMemory=$((mem * 95 / 100))"
  cat >"$dir/slurm.conf" <<EOF
ClusterName=testcluster
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
KillWait=60
MinJobAge=300
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/run/slurmdbd.pid
EOF
  chmod 600 "$dir/slurmdbd.conf"

  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster testcluster >/dev/null 2>&1 || true
  slurmctld
  slurmd
  wait_for 30 "an idle node" sh -c "sinfo -h -o %t | grep -qx idle"
  echo "slurm-cluster: up (SLURM_CONF=$SLURM_CONF)"
}

stop() {
  [ -f "$dir/slurm.conf" ] && scancel --full --quiet --user=root 2>/dev/null || true
  local db
  db=$(cat "$dir/run/mariadb-dir" 2>/dev/null || true)
  [ -n "$db" ] && [ -f "$db/mariadbd.pid" ] && cp "$db/mariadbd.pid" "$dir/run/mariadbd.pid"
  for d in slurmd slurmctld slurmdbd mariadbd; do
    [ -f "$dir/run/$d.pid" ] && kill "$(cat "$dir/run/$d.pid")" 2>/dev/null || true
  done
  for d in slurmd slurmctld slurmdbd mariadbd; do
    local pid
    pid=$(cat "$dir/run/$d.pid" 2>/dev/null || true)
    for _ in $(seq 100); do [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/run/$d.pid"
  done
  [ -n "$db" ] && [[ $db == /tmp/slurm-test-mariadb.* ]] && rm -rf "$db" "$dir/run/mariadb-dir"
  if [ -f "$dir/run/started-munged" ]; then pkill -x munged || true; rm -f "$dir/run/started-munged"; fi
  echo "slurm-cluster: stopped"
}

"$cmd"
