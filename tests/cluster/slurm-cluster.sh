#!/usr/bin/env bash
# A real Slurm cluster with accounting (slurmctld, slurmd, slurmdbd + MariaDB, munge) on this machine, for the
# tests. Needs root; installs Debian's Slurm packages when missing.
#   slurm-cluster.sh start DIR [NODES]  → writes DIR/slurm.conf; export SLURM_CONF=DIR/slurm.conf to use the cluster
#   slurm-cluster.sh stop DIR           → stops every daemon it started (the pid files in DIR/run), removes the network
# NODES=1 (default): one slurmd on this host. NODES≥2: each node is a slurmd in its own network, UTS and mount
# namespace (netns slurmtest-nodeN, eth0 = $NET.1N on a bridge $BRIDGE = $NET.1 where slurmctld listens, hostname
# nodeN, its own /etc/hosts, no default route). They share this machine's CPUs, filesystem and process list.
#   slurm-cluster.sh crash DIR N        → nodeN dies: its link goes down and every process in it is killed
#   slurm-cluster.sh boot DIR N         → nodeN is back: link up, slurmd started (it rejoins by ReturnToService=2)
# (A link flap alone: `ip link set vt-nodeN down|up`, the host side of its veth.)
set -euo pipefail
usage="usage: slurm-cluster.sh start DIR [NODES] | stop DIR | crash DIR N | boot DIR N"
cmd=${1:?$usage}
dir=$(realpath -m "${2:?$usage}")
NODES=${3:-1}
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
DB_PORT=${SLURM_TEST_DB_PORT:-3307}
BRIDGE=slurmtest0
NET=${SLURM_TEST_NET:-10.123.0}
export SLURM_CONF=$dir/slurm.conf

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND…
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "slurm-cluster: $what did not come up in ${limit}s; logs in $dir/log" >&2
  return 1
}

# Namespaced nodes: a bridge on the host, one veth per node. Only the bridge's subnet is reachable from a node.
start_network() {
  command -v ip >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 >/dev/null; }
  stop_network  # leftovers of a run that was killed before it could stop
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  printf '127.0.0.1 localhost\n%s %s\n' "$NET.1" "$(hostname -s)" >"$dir/hosts"
  for n in $(seq "$NODES"); do
    ip netns add "slurmtest-node$n"
    ip link add "vt-node$n" type veth peer name eth0 netns "slurmtest-node$n"
    ip link set "vt-node$n" master "$BRIDGE" up
    ip -n "slurmtest-node$n" addr add "$NET.1$n/24" dev eth0
    ip -n "slurmtest-node$n" link set eth0 up
    ip -n "slurmtest-node$n" link set lo up
    echo "$NET.1$n node$n" >>"$dir/hosts"
  done
  # Where bridged traffic passes iptables (br_netfilter) and FORWARD drops, let the bridge talk to itself.
  if command -v iptables >/dev/null && iptables -S FORWARD >/dev/null 2>&1; then
    iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT && touch "$dir/run/iptables-rule"
  fi
}

# Kill every process in a node's namespace until none is left: a job may still be forking meanwhile.
kill_all_in() {
  local pids
  for _ in $(seq 50); do
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [ -z "$pids" ] && return 0
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  echo "slurm-cluster: processes survive in $1" >&2
  return 1
}

stop_network() {
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^slurmtest-node/ {print $1}'); do
    kill_all_in "$ns" || true
    ip netns del "$ns" || true
  done
  # the host ends of the veths: deleting one removes the pair even if something still holds its namespace
  for link in $(ip -o link show 2>/dev/null | grep -o 'vt-node[0-9]*' | sort -u || true); do
    ip link del "$link" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if [ -f "$dir/run/iptables-rule" ]; then
    iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT || true
    rm -f "$dir/run/iptables-rule"
  fi
}

# slurmd as nodeN: inside its netns, with its own hostname and /etc/hosts (ip netns exec would remount /sys, which
# slurmd refuses).
start_node() {
  nsenter --net="/run/netns/slurmtest-node$1" unshare --uts --mount --propagation private \
    sh -c "mount --bind '$dir/hosts' /etc/hosts && hostname node$1 && exec slurmd -N node$1"
}

start() {
  [ "$(id -u)" = 0 ] || { echo "slurm-cluster: needs root" >&2; exit 1; }
  local missing=""
  for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing+="$p "; done
  if [ -n "$missing" ]; then
    echo "slurm-cluster: installing $missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  [[ $NODES =~ ^[1-9]$ ]] || { echo "slurm-cluster: NODES must be 1 to 9, got '$NODES'" >&2; exit 1; }
  mkdir -p "$dir"/{state,spool,log,run}
  local host
  host=$(hostname -s)
  getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >>/etc/hosts
  echo "$NODES" >"$dir/run/nodes"

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

  local node ctl=$host nodes
  node=$(slurmd -C | head -1)
  local mem=${node##*RealMemory=}
  node="${node% RealMemory=*} RealMemory=$((mem * 95 / 100 / NODES))"
  nodes="$node State=UNKNOWN"
  if [ "$NODES" -gt 1 ]; then
    start_network
    ctl="$host($NET.1)"
    local hw=${node#NodeName=* }
    nodes=$(for n in $(seq "$NODES"); do echo "NodeName=node$n NodeHostname=node$n NodeAddr=$NET.1$n $hw State=UNKNOWN"; done)
    mkdir -p $(for n in $(seq "$NODES"); do echo "$dir/spool/node$n"; done)
  fi
  cat >"$dir/slurm.conf" <<EOF
ClusterName=testcluster
SlurmctldHost=$ctl
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# a requeued job whose hold the tests lift starts within a second or two, not at the next pass of the schedulers
# (by default every 60 s for the main loop and 30 s for backfill)
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MpiDefault=none
KillWait=60
MinJobAge=300
SlurmdTimeout=${SLURM_TEST_SLURMD_TIMEOUT:-300}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$nodes
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
  if [ "$NODES" -gt 1 ]; then
    for n in $(seq "$NODES"); do start_node "$n"; done
  else
    mkdir -p "$dir/spool/$(hostname -s)"
    slurmd
  fi
  wait_for 30 "$NODES idle node(s)" sh -c "[ \"\$(sinfo -h -N -t idle -o %N | wc -l)\" = $NODES ]"
  echo "slurm-cluster: up (SLURM_CONF=$SLURM_CONF)"
}

stop() {
  [ -f "$dir/slurm.conf" ] && scancel --full --quiet --user=root 2>/dev/null || true
  local db
  db=$(cat "$dir/run/mariadb-dir" 2>/dev/null || true)
  [ -n "$db" ] && [ -f "$db/mariadbd.pid" ] && cp "$db/mariadbd.pid" "$dir/run/mariadbd.pid"
  local daemons
  daemons="$(cd "$dir/run" 2>/dev/null && ls slurmd*.pid 2>/dev/null | sed 's/\.pid$//' || true) slurmctld slurmdbd mariadbd"
  for d in $daemons; do
    [ -f "$dir/run/$d.pid" ] && kill "$(cat "$dir/run/$d.pid" 2>/dev/null)" 2>/dev/null || true
  done
  for d in $daemons; do
    local pid
    pid=$(cat "$dir/run/$d.pid" 2>/dev/null || true)
    for _ in $(seq 100); do [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/run/$d.pid"
  done
  [ "$(cat "$dir/run/nodes" 2>/dev/null || echo 1)" -gt 1 ] && stop_network
  [ -n "$db" ] && [[ $db == /tmp/slurm-test-mariadb.* ]] && rm -rf "$db" "$dir/run/mariadb-dir"
  if [ -f "$dir/run/started-munged" ]; then pkill -x munged || true; rm -f "$dir/run/started-munged"; fi
  echo "slurm-cluster: stopped"
}

crash() {  # crash DIR N: the third argument names the node here, not a count
  local n=$NODES
  ip link set "vt-node$n" down
  kill_all_in "slurmtest-node$n"
}

boot() {
  local n=$NODES
  ip link set "vt-node$n" up
  start_node "$n"
}

case "$cmd" in
  start|stop|crash|boot) "$cmd" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
