#!/usr/bin/env bash
# install.sh: set up ferry on one node.
#
# Installs the ferry CNI plugin, ipamd and ipamctl, writes ipamd.toml, starts
# ipamd (a systemd unit where systemd runs, else a small supervisor loop),
# waits until `ipamctl status` says it is ready, and only then writes the CNI
# conflist, so the runtime never sends a pod to a node whose ipamd is not up.
# Re-running it upgrades in place: every file is replaced atomically, and
# ipamd is restarted only when what it runs changed.
# `--uninstall` undoes it in the reverse order (conflist first).
set -euo pipefail

readonly UNIT_NAME=ferry-ipamd.service
readonly CONFLIST_NAME=10-ferry.conflist
# ipamd marks its routes with this protocol (ipamd/src/node/mod.rs).
readonly ROUTE_PROTO=102
# ferry's host-side veths (ferry_proto::HOST_VETH_PREFIX).
readonly VETH_PREFIX=fry
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR

# Defaults; every one can be set from the environment, and flags beat both.
PREFIX=${FERRY_PREFIX:-/usr/local}
CNI_BIN_DIR=${FERRY_CNI_BIN_DIR:-/opt/cni/bin}
CNI_CONF_DIR=${FERRY_CNI_CONF_DIR:-/etc/cni/net.d}
CONFIG_DIR=${FERRY_CONFIG_DIR:-/etc/ferry}
SOCKET=${FERRY_SOCKET:-${FERRY_IPAMD_SOCKET:-/run/ferry/ipamd.sock}}
STATE_DIR=${FERRY_STATE_DIR:-/var/lib/ferry}
LOG_DIR=${FERRY_LOG_DIR:-/var/log/ferry}
UNIT_DIR=${FERRY_SYSTEMD_UNIT_DIR:-/etc/systemd/system}
NODE_NAME=${FERRY_NODE_NAME:-}
POD_CIDR=${FERRY_POD_CIDR:-10.244.0.0/16}
BLOCK_SIZE=${FERRY_BLOCK_SIZE:-26}
FROM=${FERRY_FROM:-}
CNI_VERSION=${FERRY_CNI_VERSION:-auto}
PORTMAP=${FERRY_PORTMAP:-auto}
WAIT_SECS=${FERRY_WAIT_SECS:-30}
NO_SYSTEMD=${FERRY_NO_SYSTEMD:-0}
UNINSTALL=0
PURGE=0
PRINT_UNIT=0

usage() {
	cat <<EOF
Usage: install.sh [options]            install (or upgrade) ferry on this node and start ipamd
       install.sh --uninstall [options] remove it (conflist first); --purge also drops state and logs

Options (environment variable in brackets; flag beats variable beats default):
  --from DIR           where ferry, ipamd, ipamctl are [FERRY_FROM] (default: ./target/release)
  --prefix DIR         ipamd and ipamctl go to DIR/bin [FERRY_PREFIX] (default: /usr/local)
  --cni-bin-dir DIR    the ferry plugin goes here [FERRY_CNI_BIN_DIR] (default: /opt/cni/bin)
  --cni-conf-dir DIR   $CONFLIST_NAME goes here [FERRY_CNI_CONF_DIR] (default: /etc/cni/net.d)
  --config-dir DIR     ipamd.toml goes here [FERRY_CONFIG_DIR] (default: /etc/ferry)
  --socket PATH        ipamd's Unix socket [FERRY_SOCKET] (default: /run/ferry/ipamd.sock)
  --state-dir DIR      ipamd's database [FERRY_STATE_DIR] (default: /var/lib/ferry)
  --log-dir DIR        ipamd.log and the plugin's cni.log [FERRY_LOG_DIR] (default: /var/log/ferry)
  --unit-dir DIR       where the systemd unit goes [FERRY_SYSTEMD_UNIT_DIR] (default: /etc/systemd/system)
  --node-name NAME     [FERRY_NODE_NAME] (default: hostname)
  --pod-cidr CIDR      the default pool [FERRY_POD_CIDR] (default: 10.244.0.0/16)
  --block-size N       per-node block prefix length [FERRY_BLOCK_SIZE] (default: 26)
  --cni-version V      the conflist's cniVersion [FERRY_CNI_VERSION] (default: auto = 1.1.0,
                       or 1.0.0 when containerd is older than 2.0 or the portmap in the
                       CNI bin dir cannot speak 1.1.0)
  --portmap | --no-portmap
                       chain portmap after ferry [FERRY_PORTMAP=1|0] (default: when the CNI
                       bin dir has portmap)
  --wait SECS          how long to wait for ipamd to be ready [FERRY_WAIT_SECS] (default: 30)
  --no-systemd         run ipamd under a supervisor loop even where systemd runs [FERRY_NO_SYSTEMD=1]
  --print-unit         print the systemd unit install would write, and exit
  --uninstall          remove ferry from this node: conflist, ipamd, unit, binaries, config
                       and ferry's blackhole routes (proto $ROUTE_PROTO); running pods (their
                       $VETH_PREFIX* veths and /32 routes) and the state dir are left alone
  --purge              with --uninstall: also remove ipamd's database from the state dir
                       (db, db.flushes, db.corrupt-*; nothing else), the dir once empty,
                       and ferry's logs
  -h, --help           this text

Re-running install.sh upgrades in place: files are replaced atomically (temp
file, fsync, rename), and ipamd is restarted only when its binary, config or
unit changed, or it is not running.

Without systemd (or with --no-systemd) ipamd runs under a bash supervisor that
restarts it when it dies; their PIDs are in ipamd.pid and ipamd-supervisor.pid
next to the socket. A PID is only signalled while /proc/PID/cmdline shows it
is still ferry's process.
EOF
}

die() {
	echo "install.sh: error: $*" >&2
	exit 1
}
log() { echo "install.sh: $*"; }
warn() { echo "install.sh: warning: $*" >&2; }

need_arg() {
	[[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
	case $1 in
	--from) need_arg "$@"; FROM=$2; shift 2 ;;
	--prefix) need_arg "$@"; PREFIX=$2; shift 2 ;;
	--cni-bin-dir) need_arg "$@"; CNI_BIN_DIR=$2; shift 2 ;;
	--cni-conf-dir) need_arg "$@"; CNI_CONF_DIR=$2; shift 2 ;;
	--config-dir) need_arg "$@"; CONFIG_DIR=$2; shift 2 ;;
	--socket) need_arg "$@"; SOCKET=$2; shift 2 ;;
	--state-dir) need_arg "$@"; STATE_DIR=$2; shift 2 ;;
	--log-dir) need_arg "$@"; LOG_DIR=$2; shift 2 ;;
	--unit-dir) need_arg "$@"; UNIT_DIR=$2; shift 2 ;;
	--node-name) need_arg "$@"; NODE_NAME=$2; shift 2 ;;
	--pod-cidr) need_arg "$@"; POD_CIDR=$2; shift 2 ;;
	--block-size) need_arg "$@"; BLOCK_SIZE=$2; shift 2 ;;
	--cni-version) need_arg "$@"; CNI_VERSION=$2; shift 2 ;;
	--portmap) PORTMAP=1; shift ;;
	--no-portmap) PORTMAP=0; shift ;;
	--wait) need_arg "$@"; WAIT_SECS=$2; shift 2 ;;
	--no-systemd) NO_SYSTEMD=1; shift ;;
	--print-unit) PRINT_UNIT=1; shift ;;
	--uninstall) UNINSTALL=1; shift ;;
	--purge) PURGE=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
done

[[ $BLOCK_SIZE =~ ^[0-9]+$ ]] || die "--block-size must be a number, got '$BLOCK_SIZE'"
[[ $WAIT_SECS =~ ^[0-9]+$ ]] || die "--wait must be a number of seconds, got '$WAIT_SECS'"
[[ -n $NODE_NAME ]] || NODE_NAME=$(hostname)

# Absolute paths: they end up in ipamd.toml, the conflist, the unit and in
# the processes' command lines that uninstall checks.
abs_path() {
	[[ $1 != *$'\n'* ]] || die "paths must not contain a newline: '$1'"
	if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "$1"; fi
}
PREFIX=$(abs_path "$PREFIX")
CNI_BIN_DIR=$(abs_path "$CNI_BIN_DIR")
CNI_CONF_DIR=$(abs_path "$CNI_CONF_DIR")
CONFIG_DIR=$(abs_path "$CONFIG_DIR")
SOCKET=$(abs_path "$SOCKET")
STATE_DIR=$(abs_path "$STATE_DIR")
LOG_DIR=$(abs_path "$LOG_DIR")
UNIT_DIR=$(abs_path "$UNIT_DIR")

RUN_DIR=$(dirname "$SOCKET")
CONFIG_FILE=$CONFIG_DIR/ipamd.toml
CONFLIST=$CNI_CONF_DIR/$CONFLIST_NAME
UNIT_FILE=$UNIT_DIR/$UNIT_NAME
PIDFILE=$RUN_DIR/ipamd.pid
SUPERVISOR_PIDFILE=$RUN_DIR/ipamd-supervisor.pid
SUPERVISOR=$PREFIX/bin/ferry-ipamd-supervisor
IPAMD=$PREFIX/bin/ipamd
IPAMD_LOG=$LOG_DIR/ipamd.log
IPAMCTL=$PREFIX/bin/ipamctl

systemd_running() {
	[[ $NO_SYSTEMD != 1 && -d /run/systemd/system ]] && [[ $(cat /proc/1/comm 2>/dev/null) == systemd ]]
}

# A TOML basic string.
toml_str() {
	local s=${1//\\/\\\\}
	s=${s//\"/\\\"}
	printf '"%s"' "$s"
}

# A JSON string (same escaping rules for what we write).
json_str() { toml_str "$1"; }

# An argument on a unit's command line, double-quoted by systemd.service(5)'s
# rules: \ and " are escaped, % doubled (specifiers), $ doubled (variables).
systemd_arg() {
	local s=${1//\\/\\\\}
	s=${s//\"/\\\"}
	s=${s//%/%%}
	s=${s//\$/\$\$}
	printf '"%s"' "$s"
}

# The executable on a unit's command line: systemd expands no variables there
# and refuses quotes and backslashes in it outright, so only % is doubled.
systemd_exe() {
	[[ $1 != *[\"\'\\]* ]] || die "systemd cannot run a binary whose path holds a quote or backslash: $1"
	printf '"%s"' "${1//%/%%}"
}

# Creates missing directories with MODE; never changes an existing one.
make_dirs() {
	local mode=$1 d
	shift
	for d in "$@"; do
		[[ -d $d ]] || install -d -m "$mode" "$d"
	done
}

# Writes stdin to $1 so that a reader sees the old file or the new one, never
# a missing or partial one, also after a crash: a temp file in the same
# directory, fsync, rename, fsync of the directory. An identical file is left
# as it is. Sets WROTE=1 when the file was replaced, else WROTE=0.
WROTE=0
write_atomic() {
	local dest=$1 mode=$2 dir tmp
	dir=$(dirname "$dest")
	mkdir -p "$dir"
	tmp=$(mktemp "$dir/.$(basename "$dest").XXXXXX")
	if ! cat >"$tmp"; then
		rm -f "$tmp"
		die "cannot write $dest"
	fi
	if [[ -f $dest && ! -L $dest ]] && cmp -s "$tmp" "$dest"; then
		rm -f "$tmp"
		chmod "$mode" "$dest"
		WROTE=0
		return 0
	fi
	# coreutils sync with a path fsyncs that file (or directory).
	if ! { chmod "$mode" "$tmp" && sync "$tmp" && mv -fT "$tmp" "$dest"; }; then
		rm -f "$tmp"
		die "cannot replace $dest"
	fi
	sync "$dir" || die "cannot fsync $dir"
	WROTE=1
}

# True while the process runs (a zombie waiting to be reaped counts as gone).
pid_alive() {
	local stat
	[[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null || return 1
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != Z ]]
}

read_pid() {
	local f=$1 pid=""
	if [[ -r $f ]]; then read -r pid <"$f" || true; fi
	if [[ $pid =~ ^[0-9]+$ ]]; then echo "$pid"; fi
}

# ARGV := the command line of process $1; false when it has none (gone).
proc_argv() {
	ARGV=()
	[[ -n ${1:-} ]] || return 1
	mapfile -d '' -t ARGV <"/proc/$1/cmdline" 2>/dev/null || return 1
	((${#ARGV[@]} > 0))
}

# True when live process $2 is ferry's $1 (supervisor or ipamd) of this
# install, by its command line: a PID from a pidfile may have been reused.
is_ours() {
	local kind=$1 pid=$2
	pid_alive "$pid" && proc_argv "$pid" || return 1
	case $kind in
	supervisor) [[ ${ARGV[1]:-} == */ferry-ipamd-supervisor && ${ARGV[4]:-} == "$PIDFILE" ]] ;;
	ipamd) [[ ${ARGV[0]:-} == */ipamd && ${ARGV[1]:-} == --config && ${ARGV[2]:-} == "$CONFIG_FILE" ]] ;;
	*) return 1 ;;
	esac
}

# Like is_ours, but says so when the PID is live and someone else's.
may_signal() {
	local kind=$1 pid=$2 file=$3
	pid_alive "$pid" || return 1
	is_ours "$kind" "$pid" && return 0
	proc_argv "$pid" || true
	warn "$file names pid $pid, which is not ferry's $kind (it runs: ${ARGV[*]:-?}); not signalling it"
	return 1
}

# Stops the supervisor (which stops ipamd gracefully), then anything left.
stop_supervised() {
	local sup ipamd deadline p kind
	sup=$(read_pid "$SUPERVISOR_PIDFILE")
	ipamd=$(read_pid "$PIDFILE")
	may_signal supervisor "$sup" "$SUPERVISOR_PIDFILE" || sup=""
	may_signal ipamd "$ipamd" "$PIDFILE" || ipamd=""
	if [[ -n $sup ]]; then
		log "stopping the ipamd supervisor (pid $sup)"
		kill -TERM "$sup" 2>/dev/null || true
	elif [[ -n $ipamd ]]; then
		log "stopping ipamd (pid $ipamd)"
		kill -TERM "$ipamd" 2>/dev/null || true
	fi
	deadline=$((SECONDS + 20))
	while { pid_alive "$sup" || pid_alive "$ipamd"; } && ((SECONDS < deadline)); do
		sleep 0.1
	done
	for p in "$sup:supervisor" "$ipamd:ipamd"; do
		kind=${p#*:} p=${p%%:*}
		# Checked again: 20 s is long enough for a PID to be reused.
		if is_ours "$kind" "$p"; then
			warn "$kind (pid $p) did not stop on SIGTERM; killing it"
			kill -KILL "$p" 2>/dev/null || true
		fi
	done
	rm -f "$SUPERVISOR_PIDFILE" "$PIDFILE"
}

stop_ipamd() {
	if [[ -f $UNIT_FILE ]] && command -v systemctl >/dev/null && systemd_running; then
		log "stopping and disabling $UNIT_NAME"
		systemctl disable --now "$UNIT_NAME" >/dev/null 2>&1 || true
	fi
	stop_supervised
}

write_supervisor() {
	write_atomic "$SUPERVISOR" 0755 <<'EOF'
#!/usr/bin/env bash
# ferry-ipamd-supervisor IPAMD CONFIG PIDFILE SUPERVISOR_PIDFILE LOG
# Written by ferry's install.sh: keeps ipamd running where there is no systemd.
# SIGTERM stops ipamd gracefully, then the supervisor.
set -uo pipefail
ipamd=$1 config=$2 pidfile=$3 suppidfile=$4 logfile=$5
child="" pause=""
echo $$ >"$suppidfile"
stop() {
	[[ -n $pause ]] && kill -TERM "$pause" 2>/dev/null
	if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
		kill -TERM "$child" 2>/dev/null
		wait "$child" 2>/dev/null
	fi
	rm -f "$pidfile" "$suppidfile"
	exit 0
}
trap stop TERM INT HUP
while :; do
	"$ipamd" --config "$config" </dev/null >>"$logfile" 2>&1 &
	child=$!
	echo "$child" >"$pidfile"
	wait "$child"
	rc=$?
	echo "$(date '+%F %T') ferry-ipamd-supervisor: ipamd (pid $child) exited with $rc; restarting in 1 s" >>"$logfile"
	# Restart back-off; interruptible by SIGTERM.
	sleep 1 &
	pause=$!
	wait "$pause"
	pause=""
done
EOF
}

# True when the supervisor and ipamd run, are ours, and run exactly what is
# installed now (a replaced binary shows as "(deleted)" in /proc/PID/exe).
supervised_ipamd_current() {
	local sup ipamd want exe i
	sup=$(read_pid "$SUPERVISOR_PIDFILE")
	ipamd=$(read_pid "$PIDFILE")
	is_ours supervisor "$sup" || return 1
	want=(bash "$SUPERVISOR" "$IPAMD" "$CONFIG_FILE" "$PIDFILE" "$SUPERVISOR_PIDFILE" "$IPAMD_LOG")
	((${#ARGV[@]} == ${#want[@]})) || return 1
	for ((i = 1; i < ${#want[@]}; i++)); do
		[[ ${ARGV[i]} == "${want[i]}" ]] || return 1
	done
	is_ours ipamd "$ipamd" && [[ ${ARGV[0]} == "$IPAMD" ]] || return 1
	exe=$(readlink "/proc/$ipamd/exe" 2>/dev/null) || return 1
	[[ $exe == "$(readlink -f "$IPAMD")" ]]
}

start_supervised() {
	stop_supervised
	mkdir -p "$RUN_DIR" "$LOG_DIR"
	local runner=()
	command -v setsid >/dev/null && runner=(setsid)
	log "starting ipamd under $SUPERVISOR (log $IPAMD_LOG)"
	nohup "${runner[@]}" "$SUPERVISOR" "$IPAMD" "$CONFIG_FILE" "$PIDFILE" \
		"$SUPERVISOR_PIDFILE" "$IPAMD_LOG" </dev/null >>"$LOG_DIR/ipamd-supervisor.log" 2>&1 &
	# The supervisor writes its own PID first thing; wait for it.
	local deadline=$((SECONDS + 10))
	until [[ -s $SUPERVISOR_PIDFILE ]]; do
		((SECONDS < deadline)) || die "the ipamd supervisor did not start (see $LOG_DIR/ipamd-supervisor.log)"
		sleep 0.05
	done
}

# Runs in $(...): errexit is off there, hence the explicit exits.
unit_text() {
	local exe arg
	exe=$(systemd_exe "$IPAMD") || exit 1
	arg=$(systemd_arg "$CONFIG_FILE") || exit 1
	cat <<EOF
# Written by ferry's install.sh.
[Unit]
Description=ferry per-node IPAM daemon
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$exe --config $arg
Restart=always
RestartSec=1
KillSignal=SIGTERM
TimeoutStopSec=20
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
EOF
}

systemd_ipamd_current() {
	local pid exe
	systemctl is-active --quiet "$UNIT_NAME" || return 1
	pid=$(systemctl show -p MainPID --value "$UNIT_NAME" 2>/dev/null) || return 1
	exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
	[[ $exe == "$(readlink -f "$IPAMD")" ]]
}

# Starts ipamd, or restarts it when $1 is 1 (what it runs changed) or it does
# not run the installed binary.
start_systemd() {
	local changed=$1 unit
	unit=$(unit_text)
	write_atomic "$UNIT_FILE" 0644 <<<"$unit"
	if [[ $WROTE == 1 ]]; then
		changed=1
		systemctl daemon-reload
	fi
	systemctl enable "$UNIT_NAME" >/dev/null 2>&1
	if [[ $changed == 0 ]] && systemd_ipamd_current; then
		log "$UNIT_NAME runs the installed ipamd and config; not restarting it"
	else
		log "restarting $UNIT_NAME"
		systemctl restart "$UNIT_NAME"
	fi
}

ipamd_log_tail() {
	if [[ -f $UNIT_FILE ]] && systemd_running; then
		journalctl -u "$UNIT_NAME" -n 40 --no-pager 2>&1 || true
	else
		tail -n 40 "$IPAMD_LOG" 2>&1 || true
	fi
}

# Ready, or only holding new addresses after a database rebuild (that ends
# by itself after the cooldown; until then ADDs answer "try again").
ipamd_usable() {
	local out
	out=$("$IPAMCTL" --socket "$SOCKET" status 2>&1) && return 0
	if [[ $out == *"new addresses are held for another"* ]]; then
		log "ipamd is up but holds new addresses after a database rebuild; pods wait until that ends:"
		log "$(grep -m1 'reason:' <<<"$out")"
		return 0
	fi
	return 1
}

wait_ready() {
	local deadline=$((SECONDS + WAIT_SECS)) sup
	until ipamd_usable; do
		if ((SECONDS >= deadline)); then
			{
				echo "install.sh: error: ipamd did not become ready within ${WAIT_SECS}s ($IPAMCTL --socket $SOCKET status)"
				"$IPAMCTL" --socket "$SOCKET" status 2>&1 || true
				echo "--- ipamd log (last lines):"
				ipamd_log_tail
			} >&2
			return 1
		fi
		if ! systemd_running; then
			sup=$(read_pid "$SUPERVISOR_PIDFILE")
			if ! pid_alive "$sup"; then
				{
					echo "install.sh: error: the ipamd supervisor died"
					ipamd_log_tail
				} >&2
				return 1
			fi
		fi
		sleep 0.2
	done
}

conflist_version() {
	local with_portmap=$1 versions
	if [[ $CNI_VERSION != auto ]]; then
		echo "$CNI_VERSION"
		return
	fi
	# containerd before 2.0 (libcni < 1.2) rejects 1.1.0 results outright.
	local containerd_version
	if containerd_version=$(containerd --version 2>/dev/null) &&
		[[ $containerd_version =~ [[:space:]]v?([0-9]+)\.[0-9]+ ]] && ((BASH_REMATCH[1] < 2)); then
		echo 1.0.0
		return
	fi
	if [[ $with_portmap == 1 ]]; then
		versions=$(CNI_COMMAND=VERSION "$CNI_BIN_DIR/portmap" <<<'{"cniVersion":"0.4.0"}' 2>/dev/null || true)
		if [[ $versions != *'"1.1.0"'* ]]; then
			echo 1.0.0
			return
		fi
	fi
	echo 1.1.0
}

write_conflist() {
	local with_portmap=$PORTMAP version portmap_entry=""
	if [[ $with_portmap == auto ]]; then
		if [[ -x $CNI_BIN_DIR/portmap ]]; then with_portmap=1; else with_portmap=0; fi
	fi
	if [[ $with_portmap == 1 ]]; then
		[[ -x $CNI_BIN_DIR/portmap ]] || warn "$CNI_BIN_DIR/portmap is missing; pods will fail until it is installed"
		portmap_entry=',
    {"type": "portmap", "capabilities": {"portMappings": true}}'
	fi
	version=$(conflist_version "$with_portmap")
	write_atomic "$CONFLIST" 0644 <<EOF
{
  "cniVersion": "$version",
  "name": "ferry",
  "plugins": [
    {"type": "ferry", "ipamd": {"socket": $(json_str "$SOCKET"), "timeoutMs": 5000},
     "mtu": 0, "logFile": $(json_str "$LOG_DIR/cni.log"), "logLevel": "info",
     "capabilities": {"ips": true, "io.kubernetes.cri.pod-annotations": true}}$portmap_entry
  ]
}
EOF
	log "$([[ $WROTE == 1 ]] && echo wrote || echo kept) $CONFLIST (cniVersion $version$([[ $with_portmap == 1 ]] && echo ', with portmap'))"
}

do_install() {
	if [[ -z $FROM ]]; then
		if [[ -x $SCRIPT_DIR/target/release/ipamd ]]; then
			FROM=$SCRIPT_DIR/target/release
		elif [[ -x ./target/release/ipamd ]]; then
			FROM=./target/release
		else
			die "no binaries: build with 'cargo build --release' or pass --from DIR"
		fi
	fi
	local b dest changed=0
	for b in ferry ipamd ipamctl; do
		[[ -x $FROM/$b ]] || die "$FROM/$b is missing (cargo build --release, or --from DIR)"
	done

	make_dirs 0755 "$CNI_BIN_DIR" "$PREFIX/bin"
	# Replaced by rename: a runtime exec'ing ferry meanwhile runs the old or
	# the new binary, and a running ipamd keeps its (old) inode.
	for b in ferry ipamd ipamctl; do
		dest=$PREFIX/bin/$b
		[[ $b == ferry ]] && dest=$CNI_BIN_DIR/ferry
		write_atomic "$dest" 0755 <"$FROM/$b"
		if [[ $WROTE == 1 ]]; then
			log "installed $dest"
			[[ $b != ipamd ]] || changed=1
		else
			log "$dest is up to date"
		fi
	done

	make_dirs 0755 "$CONFIG_DIR" "$LOG_DIR"
	make_dirs 0700 "$STATE_DIR"
	write_atomic "$CONFIG_FILE" 0644 <<EOF
# ferry ipamd configuration, written by install.sh. Flags given to ipamd beat
# these values; see ipamd --help for the rest ([[pools]], cooldown, ...).
socket = $(toml_str "$SOCKET")
state_dir = $(toml_str "$STATE_DIR")
node_name = $(toml_str "$NODE_NAME")
pod_cidr = $(toml_str "$POD_CIDR")
block_size = $BLOCK_SIZE
EOF
	if [[ $WROTE == 1 ]]; then
		log "wrote $CONFIG_FILE"
		changed=1
	else
		log "$CONFIG_FILE is up to date"
	fi

	if systemd_running; then
		stop_supervised
		start_systemd "$changed"
	else
		write_supervisor
		[[ $WROTE == 0 ]] || changed=1
		if [[ $changed == 0 ]] && supervised_ipamd_current; then
			log "ipamd (pid $(read_pid "$PIDFILE")) runs the installed binary and config; not restarting it"
		else
			start_supervised
		fi
	fi

	log "waiting up to ${WAIT_SECS}s for ipamd on $SOCKET"
	wait_ready || die "ipamd is not ready; not writing the CNI conflist"
	log "ipamd is ready"

	# Last: from now on the runtime sends pods to ferry.
	write_conflist
	log "done"
}

# The blackhole routes ipamd keeps for its blocks; pods' /32 routes are not
# blackholes and stay.
remove_blackholes() {
	local routes
	if ! command -v ip >/dev/null; then
		warn "no ip command: ferry's blackhole routes (proto $ROUTE_PROTO) are left"
		return 0
	fi
	routes=$(ip -4 route show table main proto "$ROUTE_PROTO" type blackhole 2>/dev/null |
		awk '{print $2}' | paste -sd ' ' || true)
	[[ -n $routes ]] || return 0
	if ip -4 route flush table main proto "$ROUTE_PROTO" type blackhole; then
		log "removed ferry's blackhole routes (proto $ROUTE_PROTO): $routes"
	else
		warn "could not remove ferry's blackhole routes (proto $ROUTE_PROTO): $routes"
	fi
}

report_pods() {
	local n=0 name
	command -v ip >/dev/null || return 0
	# "7: fry0123456789a@if2: <...>": a name ferry_proto::host_veth_name makes.
	while read -r _ name _; do
		name=${name%:}
		name=${name%@*}
		[[ ! $name =~ ^${VETH_PREFIX}[0-9a-f]{11}$ ]] || n=$((n + 1))
	done < <(ip -o link show type veth 2>/dev/null)
	if ((n > 0)); then
		log "left $n running pod(s) alone: their veths ($VETH_PREFIX*) and /32 routes stay until the runtime deletes the pods"
	else
		log "no pod veths ($VETH_PREFIX*) on this node"
	fi
}

# Removes only ipamd's own files from the state dir, then the dir if that
# leaves it empty: a mistaken --state-dir must not cost anyone else's files.
purge_state() {
	local d=$STATE_DIR f name more="" removed=() other=()
	case $d in
	"" | /) die "refusing to purge state dir '$d'" ;;
	esac
	if [[ ! -d $d ]]; then
		log "no state dir $d"
		return 0
	fi
	for f in "$d"/* "$d"/.[!.]* "$d"/..?*; do
		[[ -e $f || -L $f ]] || continue
		name=${f##*/}
		case $name in
		db | db.flushes | db.flushes.tmp | db.corrupt-*)
			rm -rf -- "$f"
			removed+=("$name")
			;;
		*) other+=("$name") ;;
		esac
	done
	if ((${#removed[@]} > 0)); then
		log "removed ipamd's database from $d: ${removed[*]}"
	else
		log "$d holds none of ipamd's files (db, db.flushes, db.corrupt-*); removed nothing there"
	fi
	if ((${#other[@]} > 0)); then
		((${#other[@]} <= 10)) || more=" ..."
		log "kept $d: it also holds files that are not ferry's: ${other[*]:0:10}$more"
	elif rmdir "$d" 2>/dev/null; then
		log "removed $d"
	fi
}

do_uninstall() {
	# First, so that no new pod is sent to a node that is being taken apart.
	if [[ -e $CONFLIST ]]; then
		rm -f "$CONFLIST"
		log "removed $CONFLIST"
	fi
	stop_ipamd
	if [[ -f $UNIT_FILE ]]; then
		rm -f "$UNIT_FILE"
		if systemd_running; then systemctl daemon-reload || true; fi
		log "removed $UNIT_FILE"
	fi
	rm -f "$SOCKET" "$PIDFILE" "$SUPERVISOR_PIDFILE"
	rm -f "$CNI_BIN_DIR/ferry" "$IPAMD" "$IPAMCTL" "$SUPERVISOR"
	log "removed the binaries"
	rm -f "$CONFIG_FILE"
	rmdir "$CONFIG_DIR" 2>/dev/null || true
	rmdir "$RUN_DIR" 2>/dev/null || true
	# After ipamd stopped, so that it does not put them back.
	remove_blackholes
	report_pods
	if [[ $PURGE == 1 ]]; then
		purge_state
		rm -f "$IPAMD_LOG" "$LOG_DIR/ipamd-supervisor.log" "$LOG_DIR/cni.log"
		rmdir "$LOG_DIR" 2>/dev/null || true
		log "removed ferry's logs from $LOG_DIR"
	else
		log "kept the state in $STATE_DIR (use --purge to remove it)"
	fi
	log "ferry is uninstalled"
}

if [[ $PRINT_UNIT == 1 ]]; then
	unit=$(unit_text)
	printf '%s\n' "$unit"
	exit 0
fi
[[ $(id -u) == 0 ]] || die "run as root"
if [[ $UNINSTALL == 1 ]]; then
	do_uninstall
else
	[[ $PURGE == 0 ]] || die "--purge goes with --uninstall"
	do_install
fi
