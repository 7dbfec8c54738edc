#!/bin/sh
# vmtool guest agent @VERSION@: runs work items handed over by `vmtool queue work`.
#
# POSIX sh for busybox ash. Installed by `vmtool build --agent` as /usr/lib/vmtool/agent.sh and started at
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

V="@VERSION@"
MODE="${VMTOOL_AGENT_MODE:-@MODE@}"
PORT_NAME="${VMTOOL_AGENT_PORT:-org.vmtool.relay.0}"
GRACE="${VMTOOL_AGENT_GRACE:-120}"
WORK=/tmp/vmtool-item

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
	IFS= read -r -t 2 line <&3 || { sleep 1; line=""; }
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
		if ! IFS= read -r -t "$tick" line <&3; then
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
	STOP)
		say BYE
		break
		;;
	*) log "ignoring unknown command from host: $1" ;;
	esac
done
sync
exit 0
