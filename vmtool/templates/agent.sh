#!/bin/sh
# vmtool guest agent @VERSION@: runs work items handed over by `vmtool queue work`.
#
# POSIX sh: busybox ash, or dash with coreutils and mawk. Installed by `vmtool build --agent` as /usr/lib/vmtool/agent.sh and started at
# boot by /etc/vmtool/rc.d/50-vmtool-agent. It serves items until the host says STOP (or the host has been
# silent for VMTOOL_AGENT_GRACE seconds), then returns so the image's init powers the VM off.
#
# Relay protocol (line based, over the virtio-serial port named org.vmtool.relay.0; the guest never needs
# a network route to the queue). Binary data travels as base64 lines ended by a line holding only ".":
#   guest: HELLO vmtool-agent <version> <mode>        (repeated every 2 s until the host answers)
#   host:  PING                                        (keep-alive while the host waits for work)
#   host:  ITEM <seq> <timeout_s> <max_output>         then the job script as base64 lines, then "."
#   guest: RESULT <seq> <exit> <guest_seconds>, STDOUT + lines + ".", STDERR + lines + ".",
#          OUTPUT <name> + lines + "." per file the job left in $VMTOOL_OUTDIR, END <seq>
#   host:  STOP                                        (agent answers BYE and exits)
# Direct mode: see run_direct below.

V="@VERSION@"
MODE="${VMTOOL_AGENT_MODE:-@MODE@}"
PORT_NAME="${VMTOOL_AGENT_PORT:-org.vmtool.relay.0}"
GRACE="${VMTOOL_AGENT_GRACE:-120}"
WORK="${TMPDIR:-/tmp}/vmtool-item"

log() { echo "vmtool-agent: $*" >&2; }

find_port() {
	for n in /sys/class/virtio-ports/*/name; do
		[ -r "$n" ] || continue
		if [ "$(cat "$n")" = "$PORT_NAME" ]; then
			d="${n%/name}"
			echo "/dev/${d##*/}"
			return 0
		fi
	done
	return 1
}

uptime_s() { cut -d' ' -f1 /proc/uptime; }

# read_line SECONDS: one line from the host (fd 3) into $line, failing after SECONDS. busybox ash and
# bash have `read -t`; dash (Debian's /bin/sh) has not, so there a child sh reads it under timeout(1).
if (echo x | { read -r -t 1 _; }) 2> /dev/null; then
	read_line() { IFS= read -r -t "$1" line <&3; }
else
	read_line() {
		line=$(timeout "$1" sh -c 'IFS= read -r l <&3 && printf "%s." "$l"') || { line=""; return 1; }
		line="${line%.}"
	}
fi

say() { printf '%s\n' "$*" >&3; }

# send_section HEADER FILE LIMIT: the last LIMIT bytes of FILE as base64 lines, then "."
send_section() {
	say "$1"
	if [ -s "$2" ]; then tail -c "$3" "$2" | base64 >&3; fi
	say .
}

# read_b64 FILE: base64 lines from the host up to "." into FILE
read_b64() {
	while IFS= read -r l <&3; do
		[ "$l" = . ] && return 0
		printf '%s\n' "$l"
	done > "$1"
	return 1
}

run_item() {
	seq="$1"
	tmo="$2"
	maxout="$3"
	rm -rf "$WORK"
	mkdir -p "$WORK/out"
	if ! read_b64 "$WORK/job.b64"; then
		log "host went away while sending item $seq"
		return 1
	fi
	base64 -d "$WORK/job.b64" > "$WORK/job.sh" 2> "$WORK/decode.err"
	t0=$(uptime_s)
	(cd "$WORK" && VMTOOL_OUTDIR="$WORK/out" VMTOOL_ITEM_SEQ="$seq" \
		timeout "$tmo" sh ./job.sh < /dev/null > "$WORK/stdout" 2> "$WORK/stderr")
	rc=$?
	t1=$(uptime_s)
	took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
	say "RESULT $seq $rc $took"
	send_section STDOUT "$WORK/stdout" "$maxout"
	send_section STDERR "$WORK/stderr" "$maxout"
	nout=0
	for f in "$WORK"/out/*; do
		[ -f "$f" ] || continue
		n="${f##*/}"
		# Only plain names come back (the host refuses others), at most 16 files.
		case "$n" in
		*[!A-Za-z0-9._-]* | .* | -*) log "item $seq: output $n skipped (not a plain file name)"; continue ;;
		esac
		[ "${#n}" -le 100 ] || continue
		nout=$((nout + 1))
		[ "$nout" -gt 16 ] && { log "item $seq: more than 16 output files; the rest skipped"; break; }
		say "OUTPUT $n"
		head -c "$maxout" "$f" | base64 >&3
		say .
	done
	say "END $seq"
	rm -rf "$WORK"
	return 0
}

# --- direct mode (the seed's way; unsafe unless beanstalkd is reached through a tunnel) ---------------
# The host answers HELLO with DIRECT <host> <port> <tube> <idle_s> <max_attempts> <vm name>; the agent
# then is a beanstalkd client itself (busybox nc): reserve from <tube>, run, put the result on
# <tube>.results, delete; malformed and poison items are buried with a note on <tube>.buried-reasons.
CR=$(printf '\r')

# json_str FILE LIMIT: the last LIMIT bytes of FILE as a JSON string (control characters dropped)
json_str() {
	if [ -s "$1" ]; then
		nl=0
		[ "$(tail -c 1 "$1" | od -An -c | tr -d ' ')" = '\n' ] && nl=1
		tail -c "$2" "$1" | tr -d '\000-\010\013\014\016-\037' | awk -v nl="$nl" '
			BEGIN { printf "\"" }
			{ if (NR > 1) printf "\\n"; gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); gsub(/\t/, "\\t")
			  gsub(/\r/, "\\r"); printf "%s", $0 }
			END { if (NR > 0 && nl == 1) printf "\\n"; printf "\"" }'
	else
		printf '""'
	fi
}

# bs COMMAND: one beanstalkd command on fd 4/5; its first response line in $resp
bs() {
	printf '%s\r\n' "$1" >&4
	IFS= read -r resp <&5
	resp="${resp%"$CR"}"
}

# bs_put TUBE FILE: put FILE's bytes on TUBE, then use the results tube again
bs_put() {
	bs "use $1"
	printf 'put 1024 0 60 %s\r\n' "$(wc -c < "$2")" >&4
	cat "$2" >&4
	printf '\r\n' >&4
	IFS= read -r resp <&5
	resp="${resp%"$CR"}"
	put_resp="$resp"
	bs "use $tube.results"
}

# bury_note JOB ITEM_ID REASON_FILE
bury_note() {
	{
		printf '{"job":%s,"item_id":%s,"reason":' "$1" "$2"
		json_str "$3" 1000
		printf ',"attempts":%s,"tube":"%s"}' "${4:-0}" "$tube"
	} > "$WORK/note.json"
	bs_put "$tube.buried-reasons" "$WORK/note.json"
	bs "bury $1 1024"
}

# job_stats JOB: reserves and releases of a job into $reserves $releases
job_stats() {
	reserves=1
	releases=0
	bs "stats-job $1"
	case "$resp" in OK*) ;; *) return ;; esac
	while IFS= read -r l <&5; do
		l="${l%"$CR"}"
		[ -z "$l" ] && break
		case "$l" in
		"reserves: "*) reserves="${l#reserves: }" ;;
		"releases: "*) releases="${l#releases: }" ;;
		esac
	done
}

# net_up: images without their own network set-up (the default image) get QEMU user-mode networking's
# fixed addresses on their first interface: 10.0.2.15/24, gateway (and the host) 10.0.2.2.
net_up() {
	[ "${VMTOOL_AGENT_NET:-}" = skip ] && return 0
	ip route 2> /dev/null | grep -q '^default' && return 0
	for n in /sys/class/net/*; do
		i="${n##*/}"
		[ "$i" = lo ] && continue
		ip link set lo up 2> /dev/null
		ip link set "$i" up && ip addr add 10.0.2.15/24 dev "$i" && ip route add default via 10.0.2.2 && {
			log "network: $i 10.0.2.15/24 via 10.0.2.2"
			return 0
		}
	done
	log "no network interface to reach the queue"
	return 1
}

# make_result LIMIT WITH_OUTPUTS TRUNCATED: the result JSON of the current item into $WORK/result.json
make_result() {
	{
		printf '{"v":1,"id":"%s","status":"%s","exit":%s,"stdout":' "$id" "$st" "$rc"
		json_str "$WORK/stdout" "$1"
		printf ',"stderr":'
		json_str "$WORK/stderr" "$1"
		printf ',"outputs":{'
		sep=""
		nout=0
		for f in "$WORK"/out/*; do
			[ "$2" = 1 ] || break
			[ -f "$f" ] || continue
			o="${f##*/}"
			case "$o" in *[!A-Za-z0-9._-]* | .* | -*) continue ;; esac
			nout=$((nout + 1))
			[ "$nout" -gt 16 ] && break
			printf '%s"%s":"%s"' "$sep" "$o" "$(head -c "$1" "$f" | base64 -w 0)"
			sep=,
		done
		printf '},"vm":"%s","duration_s":%s,"attempt":%s,"error":null,"truncated":%s}' \
			"$vmname" "$took" "$((lost + 1))" "$3"
	} > "$WORK/result.json"
}

run_direct() {
	net_up || return 0
	host="$1"
	port="$2"
	tube="$3"
	idle="$4"
	maxatt="$5"
	vmname="$6"
	D="${TMPDIR:-/tmp}/vmtool-nc"
	rm -rf "$D"
	mkdir -p "$D"
	mkfifo "$D/in" "$D/out"
	nc "$host" "$port" < "$D/in" > "$D/out" &
	ncpid=$!
	exec 4> "$D/in" 5< "$D/out"
	bs "watch $tube"
	bs "ignore default"
	bs "use $tube.results"
	log "direct mode: reserving from $host:$port tube $tube"
	while :; do
		bs "reserve-with-timeout $idle"
		case "$resp" in
		RESERVED*) ;;
		*)
			log "queue idle or gone ($resp)"
			break
			;;
		esac
		set -- $resp
		jid="$2"
		IFS= read -r body <&5
		rm -rf "$WORK"
		mkdir -p "$WORK/out"
		printf '%s\n' "${body%"$CR"}" > "$WORK/item.json"
		if ! awk -f "${VMTOOL_AGENT_ITEM_AWK:-/usr/lib/vmtool/agent-item.awk}" "$WORK/item.json" > "$WORK/job.sh" 2> "$WORK/why"; then
			bury_note "$jid" null "$WORK/why"
			continue
		fi
		id=$(sed -n 's/^#id //p' "$WORK/job.sh")
		tmo=$(sed -n 's/^#timeout //p' "$WORK/job.sh")
		max=$(sed -n 's/^#max //p' "$WORK/job.sh")
		job_stats "$jid"
		lost=$((reserves - 1 - releases))
		if [ "$lost" -ge "$maxatt" ]; then
			echo "failed $lost times; last: its VM or worker died or its TTR expired" > "$WORK/why"
			bury_note "$jid" "\"$id\"" "$WORK/why" "$lost"
			continue
		fi
		t0=$(uptime_s)
		(
			cd "$WORK" && VMTOOL_OUTDIR="$WORK/out" timeout "$tmo" sh ./job.sh < /dev/null > "$WORK/stdout" 2> "$WORK/stderr"
			echo $? > "$WORK/rc"
		) &
		n=0
		while [ ! -s "$WORK/rc" ]; do
			sleep 0.1
			n=$((n + 1))
			[ $((n % 100)) -eq 0 ] && bs "touch $jid"
		done
		rc=$(cat "$WORK/rc")
		t1=$(uptime_s)
		took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
		st=ok
		[ "$rc" -ne 0 ] && st=failed
		if [ "$rc" -eq 124 ] || [ "$rc" -eq 143 ]; then
			awk -v a="$took" -v t="$tmo" 'BEGIN { exit !(a >= t - 1) }' && st=timeout
		fi
		make_result "$max" 1 false
		bs_put "$tube.results" "$WORK/result.json"
		case "$put_resp" in
		INSERTED*) ;;
		*)
			# Too big for the server (or refused): send the tails only, marked truncated.
			make_result 4096 0 true
			bs_put "$tube.results" "$WORK/result.json"
			;;
		esac
		case "$put_resp" in
		INSERTED*)
			bs "delete $jid"
			say "DID $id $st $rc $took"
			;;
		*)
			echo "the result could not be stored ($put_resp)" > "$WORK/why"
			bury_note "$jid" "\"$id\"" "$WORK/why" "$lost"
			;;
		esac
	done
	printf 'quit\r\n' >&4
	exec 4>&- 5<&-
	kill "$ncpid" 2> /dev/null
}

i=0
DEV="${VMTOOL_AGENT_DEV:-}"
while [ -z "$DEV" ] && ! DEV=$(find_port); do
	i=$((i + 1))
	if [ "$i" -gt 30 ]; then
		log "no virtio-serial port named $PORT_NAME; not started by vmtool queue work?"
		exit 0
	fi
	sleep 1
done
[ -c "$DEV" ] || { log "$DEV is not a character device"; exit 1; }
exec 3<> "$DEV"
log "version $V ($MODE) on $DEV"

# Announce until the host answers; then serve commands until STOP or a silent host.
line=""
waited=0
while [ -z "$line" ]; do
	say "HELLO vmtool-agent $V $MODE"
	read_line 2 || { sleep 1; line=""; }
	waited=$((waited + 3))
	if [ "$waited" -gt "$GRACE" ]; then
		log "no host on $DEV after ${GRACE}s"
		exit 0
	fi
done

silent=0
tick=10
[ "$GRACE" -lt "$tick" ] && tick="$GRACE"
while :; do
	if [ -z "$line" ]; then
		if ! read_line "$tick"; then
			line=""
			silent=$((silent + tick))
			if [ "$silent" -ge "$GRACE" ]; then
				log "host silent for ${silent}s; stopping"
				break
			fi
			sleep 1
			continue
		fi
	fi
	silent=0
	set -- $line
	line=""
	case "$1" in
	PING) ;;
	ITEM) run_item "$2" "$3" "$4" || break ;;
	DIRECT)
		say "DIRECTING"
		run_direct "$2" "$3" "$4" "$5" "$6" "$7"
		say "DONE"
		break
		;;
	STOP)
		say BYE
		break
		;;
	*) log "ignoring unknown command from host: $1" ;;
	esac
done
sync
exit 0
