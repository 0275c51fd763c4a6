#!/bin/bash
# A single-node Slurm cluster for the launcher's integration tests (tests/test_slurm_*.py) and for
# trying `ssl-container launch` on one machine. Debian bookworm packages (slurm 22.05, munge 0.5,
# mariadb 10.11), run as root, no systemd, no cgroups; everything lives under $SLURM_BASE.
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server
# (slurmdbd + mariadb give sacct, which submitit polls for job states; without them every state is
# UNKNOWN and a job killed from outside is never noticed.)
#
# usage: cluster.sh start|stop|status|restart|env
#   clients: export SLURM_CONF=$SLURM_BASE/etc/slurm.conf     (`cluster.sh env` prints that line)
# environment:
#   SLURM_BASE        state, logs, sockets, database (default /tmp/ssl-container-slurm)
#   SLURM_PORT        slurmctld port; slurmd uses +1, slurmdbd +2 (default 6817)
#   SLURM_DB_PORT     mariadb port (default 3307)
#   SLURM_ACCOUNTING  0 skips mariadb + slurmdbd (sacct then fails)
# Adapted from the script verified in ../shared/reference/local_slurm/ (lessons recorded there).
set -u
SLURM_BASE=${SLURM_BASE:-/tmp/ssl-container-slurm}
SLURM_PORT=${SLURM_PORT:-6817}
SLURM_ACCOUNTING=${SLURM_ACCOUNTING:-1}
command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null || SLURM_ACCOUNTING=0
export SLURM_CONF=$SLURM_BASE/etc/slurm.conf
M=$SLURM_BASE/munge
SOCK=$M/munge.socket.2
DB=$SLURM_BASE/mysql
DBPORT=${SLURM_DB_PORT:-3307}
CTLD_PORT=$SLURM_PORT
SLURMD_PORT=$((SLURM_PORT + 1))
DBD_PORT=$((SLURM_PORT + 2))

write_conf() {
  local host hw mem
  host=$(hostname -s)
  # real topology from slurmd itself (NOT nproc: GNU nproc obeys OMP_NUM_THREADS)
  hw=$(SLURM_CONF=/dev/null slurmd -C | head -1 | sed 's/ RealMemory=.*//; s/^NodeName=[^ ]* //')
  mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 85 / 100 ))
  mkdir -p "$SLURM_BASE"/{etc,state,spool,log,run,jobs} "$M"
  chmod 755 "$SLURM_BASE" "$M"        # munged: socket dir must be o+x, not group/other-writable
  cat > "$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$SLURM_BASE/state
SlurmdSpoolDir=$SLURM_BASE/spool
SlurmctldPidFile=$SLURM_BASE/run/slurmctld.pid
SlurmdPidFile=$SLURM_BASE/run/slurmd.pid
SlurmctldLogFile=$SLURM_BASE/log/slurmctld.log
SlurmdLogFile=$SLURM_BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
# reject impossible requests at submit time instead of leaving them PENDING (PartitionConfig) forever
EnforcePartLimits=ALL
NodeName=$host NodeAddr=127.0.0.1 $hw RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$SLURM_ACCOUNTING" = 1 ]; then
    cat >> "$SLURM_CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# for slurmdbd connections this names the munge socket
AccountingStoragePass=$SOCK
EOF
    cat > "$SLURM_BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$SLURM_BASE/log/slurmdbd.log
PidFile=$SLURM_BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$SLURM_BASE/etc/slurmdbd.conf"   # slurmdbd refuses a world-readable conf
  else
    echo "AccountingStorageType=accounting_storage/none" >> "$SLURM_CONF"
  fi
}

alive() { [ -e "/proc/$1" ] && ! grep -q '^[^)]*) Z' "/proc/$1/stat" 2>/dev/null; }   # zombie = dead
pid_alive() { [ -f "$1" ] && alive "$(cat "$1")"; }
wait_for() { for _ in $(seq 1 "$2"); do eval "$1" && return 0; sleep 0.25; done; return 1; }

start_db() {
  mkdir -p "$DB"
  if [ ! -d "$DB/data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$DB/data" --user=root --skip-test-db >"$DB/install.log" 2>&1 \
      || { cat "$DB/install.log"; return 1; }
  fi
  if ! pid_alive "$DB/mysqld.pid"; then
    # ( ... & ) detaches it from this shell (mariadbd does not daemonize itself)
    ( setsid /usr/sbin/mariadbd --no-defaults --datadir="$DB/data" --user=root --bind-address=127.0.0.1 \
      --port="$DBPORT" --socket="$DB/mysqld.sock" --pid-file="$DB/mysqld.pid" --log-error="$DB/mysqld.err" \
      --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 & )
    wait_for "mariadb -S '$DB/mysqld.sock' -u root -e 'select 1' >/dev/null 2>&1" 120 \
      || { tail "$DB/mysqld.err"; return 1; }
  fi
  mariadb -S "$DB/mysqld.sock" -u root -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || return 1
  pid_alive "$SLURM_BASE/run/slurmdbd.pid" || slurmdbd || return 1
  wait_for "(exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT) 2>/dev/null" 120 || { tail "$SLURM_BASE/log/slurmdbd.log"; return 1; }
}

start() {
  local t0; t0=$(date +%s%N)
  write_conf
  [ -f "$M/munge.key" ] || mungekey --create --keyfile="$M/munge.key"
  chmod 600 "$M/munge.key"
  if ! pid_alive "$M/munged.pid"; then
    /usr/sbin/munged --socket="$SOCK" --key-file="$M/munge.key" --log-file="$M/munged.log" \
      --pid-file="$M/munged.pid" --seed-file="$M/munged.seed" || { cat "$M/munged.log"; return 1; }
  fi
  if [ "$SLURM_ACCOUNTING" = 1 ]; then start_db || return 1; fi
  pid_alive "$SLURM_BASE/run/slurmctld.pid" || slurmctld -f "$SLURM_CONF" || return 1
  pid_alive "$SLURM_BASE/run/slurmd.pid"    || slurmd    -f "$SLURM_CONF" || return 1
  if wait_for "sinfo -h -o %T 2>/dev/null | grep -qx idle" 240; then
    printf 'slurm up in %d ms (accounting=%s): ' "$(( ($(date +%s%N) - t0) / 1000000 ))" "$SLURM_ACCOUNTING"
    sinfo -h; return 0
  fi
  echo "slurm did not come up"; tail -20 "$SLURM_BASE"/log/*.log; return 1
}

stop_pid() {  # pidfile [cmd-to-stop]
  pid_alive "$1" || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null
  wait_for "! alive $pid" 80 || kill -9 "$pid" 2>/dev/null
}

stepds() {  # slurmstepd processes started by THIS cluster's slurmd (their environment carries our SLURM_CONF)
  local d
  for d in /proc/[0-9]*; do
    [ "$(cat "$d/comm" 2>/dev/null)" = slurmstepd ] || continue
    { tr '\0' '\n' < "$d/environ"; } 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF" && echo "${d#/proc/}"
  done
}

stop() {
  if pid_alive "$SLURM_BASE/run/slurmctld.pid"; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null      # cancel leftover jobs first
    wait_for "[ -z \"\$(squeue -h 2>/dev/null)\" ]" 120
    scontrol shutdown >/dev/null 2>&1     # stops slurmctld and all slurmd
    wait_for "! pid_alive '$SLURM_BASE/run/slurmctld.pid'" 40
  fi
  stop_pid "$SLURM_BASE/run/slurmd.pid"
  stop_pid "$SLURM_BASE/run/slurmctld.pid"
  local p
  for p in $(stepds); do kill -9 "$p" 2>/dev/null; done   # orphaned job steps of this cluster, by pid
  stop_pid "$SLURM_BASE/run/slurmdbd.pid"
  stop_pid "$DB/mysqld.pid"
  stop_pid "$M/munged.pid"
  echo "slurm stopped"
}

status() {
  for f in "$M/munged.pid" "$DB/mysqld.pid" "$SLURM_BASE/run/slurmdbd.pid" \
           "$SLURM_BASE/run/slurmctld.pid" "$SLURM_BASE/run/slurmd.pid"; do
    if pid_alive "$f"; then echo "$(basename "$f" .pid): running pid $(cat "$f")"; else echo "$(basename "$f" .pid): down"; fi
  done
  sinfo 2>&1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 start|stop|status|restart|env"; exit 2 ;;
esac
