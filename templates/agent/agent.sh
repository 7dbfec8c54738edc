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
#   host:  ITEM <seq> <timeout_s> <max_output> <scratch_bytes> <nfiles>
#          then the job script as base64 lines, then "."
#   host:  FILE <name> <size> and <size> raw bytes       (nfiles times; the guest answers GOT <name>)
#   guest: RESULT <seq> <exit> <guest_seconds> <scratch_used>, STDOUT + lines + ".", STDERR + lines + ".",
#          OUTPUTS <n> then "<type> <size> <name>" per entry the job left in $VMTOOL_OUTDIR
#   host:  SEND <name> <bytes>  (guest: DATA <name> <bytes> and the raw bytes) per output it takes; DONE
#   guest: END <seq>
# The item runs in $WORK, a tmpfs of <scratch_bytes> (the inputs, $VMTOOL_OUTDIR and the job's files).
#   host:  STOP                                        (agent answers BYE and exits)
# Direct mode: see run_direct below.

V="@VERSION@"
MODE="${VMTOOL_AGENT_MODE:-@MODE@}"
PORT_NAME="${VMTOOL_AGENT_PORT:-org.vmtool.relay.0}"
GRACE="${VMTOOL_AGENT_GRACE:-120}"
WORK="${TMPDIR:-/tmp}/vmtool-item"
CTL="${TMPDIR:-/tmp}/vmtool-ctl"

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

# scratch_up BYTES: a fresh tmpfs of that size on $WORK (the item's scratch space), else a directory.
# Few processes per item: under TCG every fork+exec costs tens of milliseconds.
mounted=0
scratch_up() {
	work_down
	mkdir -p "$WORK"
	if mount -t tmpfs -o "size=$((($1 + 1023) / 1024))k,mode=0700" vmtool-scratch "$WORK" 2> /dev/null; then
		mounted=1
	fi
	mkdir -p "$WORK/out" "$CTL"
}

work_down() {
	if [ "$mounted" = 1 ]; then
		umount "$WORK" 2> /dev/null || umount -l "$WORK"
		mounted=0
	fi
	if [ -e "$WORK" ]; then rm -rf "$WORK"; fi
}

scratch_down() {
	if [ "$mounted" = 1 ]; then
		umount "$WORK" 2> /dev/null || umount -l "$WORK"
		mounted=0
	fi
	rm -rf "$WORK" "$CTL"
}

# scratch_used: bytes used in $WORK, into $used
scratch_used() {
	used=0
	if [ "$mounted" = 1 ]; then
		df -k "$WORK" > "$CTL/df" 2> /dev/null
		{
			read -r _
			read -r _ _ u _
		} < "$CTL/df"
	else
		u=$(du -sk "$WORK" 2> /dev/null)
		u="${u%%[!0-9]*}"
	fi
	case "$u" in '' | *[!0-9]*) u=0 ;; esac
	used=$((u * 1024))
}

fsize() { stat -c %s "$1" 2> /dev/null || wc -c < "$1"; }

# list_outputs: "OUTPUTS <n>" then "<type> <size> <name>" per entry of $WORK/out (type f file, l symlink,
# d directory, o other, n a name that is not plain: shown as ?); the host decides what to take.
list_outputs() {
	n=0
	for f in "$WORK"/out/* "$WORK"/out/.*; do
		case "${f##*/}" in . | ..) continue ;; esac
		[ -e "$f" ] || [ -L "$f" ] || continue
		n=$((n + 1))
	done
	say "OUTPUTS $n"
	k=0
	for f in "$WORK"/out/* "$WORK"/out/.*; do
		b="${f##*/}"
		case "$b" in . | ..) continue ;; esac
		[ -e "$f" ] || [ -L "$f" ] || continue
		k=$((k + 1))
		[ "$k" -gt 65 ] && break
		if [ -L "$f" ]; then t=l; elif [ -d "$f" ]; then t=d; elif [ -f "$f" ]; then t=f; else t=o; fi
		sz=0
		[ "$t" = f ] && sz=$(fsize "$f")
		case "$b" in *[!A-Za-z0-9._-]* | .* | -*) t=n b='?' ;; esac
		[ "${#b}" -le 100 ] || { t=n; b='?'; }
		say "$t $sz $b"
	done
}

run_item() {
	seq="$1"
	tmo="$2"
	maxout="$3"
	scratch="$4"
	nfiles="$5"
	if [ -e "$CTL" ]; then rm -rf "$CTL"; fi
	scratch_up "$scratch"
	if ! read_b64 "$CTL/job.b64"; then
		log "host went away while sending item $seq"
		return 1
	fi
	base64 -d "$CTL/job.b64" > "$CTL/job.sh" 2> "$CTL/decode.err"
	# Inputs: FILE <name> <size> and that many raw bytes each; GOT <name> (or FAIL) after each.
	k=0
	while [ "$k" -lt "$nfiles" ]; do
		IFS= read -r l <&3 || return 1
		set -- $l
		[ "$1" = FILE ] || { log "item $seq: expected FILE, got $1"; return 1; }
		case "$2" in *[!A-Za-z0-9._-]* | .* | -* | '') log "item $seq: bad input name"; return 1 ;; esac
		if dd of="$WORK/$2" bs=65536 count="$3" iflag=count_bytes,fullblock <&3 2> "$CTL/dd.err" &&
			[ "$(fsize "$WORK/$2")" = "$3" ]; then
			say "GOT $2"
		else
			say "FAIL $2 $(tail -n 1 "$CTL/dd.err" | tr -cd 'A-Za-z0-9 .:_-')"
			return 1
		fi
		k=$((k + 1))
	done
	t0=$(uptime_s)
	(cd "$WORK" && VMTOOL_OUTDIR="$WORK/out" VMTOOL_ITEM_SEQ="$seq" TMPDIR="$WORK" \
		timeout "$tmo" sh "$CTL/job.sh" < /dev/null > "$CTL/stdout" 2> "$CTL/stderr")
	rc=$?
	t1=$(uptime_s)
	took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
	scratch_used
	say "RESULT $seq $rc $took $used"
	send_section STDOUT "$CTL/stdout" "$maxout"
	send_section STDERR "$CTL/stderr" "$maxout"
	list_outputs
	# The host asks for each output it takes: SEND <name> <bytes>; DATA <name> <bytes> and the bytes.
	while IFS= read -r l <&3; do
		set -- $l
		case "$1" in
		SEND)
			case "$2" in *[!A-Za-z0-9._-]* | .* | -* | '') log "item $seq: bad output name from host"; return 1 ;; esac
			say "DATA $2 $3"
			dd if="$WORK/out/$2" bs=65536 count="$3" iflag=count_bytes 2> /dev/null >&3
			;;
		DONE) break ;;
		PING) ;;
		*) log "item $seq: unexpected $1 while sending outputs" ;;
		esac
	done
	say "END $seq"
	scratch_down
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
	} > "$CTL/note.json"
	bs_put "$tube.buried-reasons" "$CTL/note.json"
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

# make_result LIMIT WITH_OUTPUTS TRUNCATED: the result JSON of the current item into $CTL/result.json
make_result() {
	{
		printf '{"v":1,"id":"%s","status":"%s","exit":%s,"stdout":' "$id" "$st" "$rc"
		json_str "$CTL/stdout" "$1"
		printf ',"stderr":'
		json_str "$CTL/stderr" "$1"
		printf ',"outputs":{'
		if [ -n "$outurl" ]; then
			[ "$st" != error ] && [ -s "$CTL/uploaded" ] && cat "$CTL/uploaded"
		else
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
		fi
		printf '},"vm":"%s","duration_s":%s,"attempt":%s,"error":' "$vmname" "$took" "$((lost + 1))"
		if [ -s "$CTL/err" ]; then json_str "$CTL/err" 2000; else printf null; fi
		printf ',"truncated":%s,"bytes_in":%s,"bytes_out":%s,"transfer_s":%s}' "$3" "$bytes_in" "$bytes_out" "$tx"
	} > "$CTL/result.json"
}

# fetch_inputs: the item's URL inputs ("#in NAME SHA256|- URL" lines) into $WORK with busybox wget,
# checked against their sha256 and limits.max_input_bytes; why not into $CTL/err.
fetch_inputs() {
	: > "$CTL/err"
	sed -n 's/^#in //p' "$CTL/job.sh" > "$CTL/inputs"
	while read -r name sha url; do
		case "$url" in
		http://* | https://*) ;;
		*)
			echo "input $name: $url: direct mode fetches only http(s) inputs (use relay mode for s3, sftp and file)" > "$CTL/err"
			return 1
			;;
		esac
		if ! wget -q -O "$WORK/$name" "$url" < /dev/null 2> "$CTL/wget.err"; then
			echo "input $name: cannot fetch $url: $(tail -n 1 "$CTL/wget.err")" > "$CTL/err"
			return 1
		fi
		sz=$(fsize "$WORK/$name")
		bytes_in=$((bytes_in + sz))
		if [ "$bytes_in" -gt "$maxin" ]; then
			echo "inputs are more than the item's input limit of $maxin bytes (limits.max_input_bytes)" > "$CTL/err"
			return 1
		fi
		if [ "$sha" != - ]; then
			got=$(sha256sum "$WORK/$name" | cut -d' ' -f1)
			if [ "$got" != "$sha" ]; then
				echo "input $name ($url): checksum mismatch: expected sha256 $sha, got $got" > "$CTL/err"
				return 1
			fi
		fi
	done < "$CTL/inputs"
	return 0
}

# http_put URL FILE: PUT FILE to an http:// URL with busybox nc; 0 if the server answered 2xx.
http_put() {
	rest="${1#http://}"
	hp="${rest%%/*}"
	path="/${rest#*/}"
	host="${hp%:*}"
	port="${hp##*:}"
	[ "$host" = "$hp" ] && port=80
	{
		printf 'PUT %s HTTP/1.0\r\nHost: %s\r\nContent-Length: %s\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n' \
			"$path" "$hp" "$(fsize "$2")"
		cat "$2"
	} | nc "$host" "$port" > "$CTL/put.resp" 2> /dev/null
	code=$(head -n 1 "$CTL/put.resp" | cut -d' ' -f2)
	case "$code" in 2??) return 0 ;; esac
	echo "HTTP ${code:-no answer}"
	return 1
}

# put_outputs: every file in $WORK/out PUT to $outurl<name> (http:// only in direct mode), after the same
# checks as the host's (plain names, regular files, limits.max_output_bytes); JSON into $CTL/uploaded.
put_outputs() {
	case "$outurl" in
	http://*) ;;
	*)
		echo "output_url $outurl: direct mode uploads only by http:// PUT (use relay mode for s3, sftp, https and file)" > "$CTL/err"
		return 1
		;;
	esac
	total=0
	for f in "$WORK"/out/* "$WORK"/out/.*; do
		b="${f##*/}"
		case "$b" in . | ..) continue ;; esac
		[ -e "$f" ] || [ -L "$f" ] || continue
		case "$b" in *[!A-Za-z0-9._-]* | .* | -*) echo "an output's name is not a plain file name ([A-Za-z0-9._-], no path, no leading dot)" > "$CTL/err"; return 1 ;; esac
		[ -L "$f" ] && { echo "output $b is a symbolic link: only regular files are outputs" > "$CTL/err"; return 1; }
		[ -d "$f" ] && { echo "output $b is a directory: only regular files are outputs" > "$CTL/err"; return 1; }
		[ -f "$f" ] || { echo "output $b is not a regular file" > "$CTL/err"; return 1; }
		total=$((total + $(fsize "$f")))
	done
	if [ "$total" -gt "$maxoutb" ]; then
		echo "outputs are $total bytes, more than the item's limit of $maxoutb (limits.max_output_bytes)" > "$CTL/err"
		return 1
	fi
	sep=""
	: > "$CTL/uploaded"
	for f in "$WORK"/out/*; do
		[ -f "$f" ] || continue
		b="${f##*/}"
		if ! why=$(http_put "$outurl$b" "$f"); then
			echo "cannot upload output $b to $outurl$b: $why" > "$CTL/err"
			: > "$CTL/uploaded"
			return 1
		fi
		sz=$(fsize "$f")
		bytes_out=$((bytes_out + sz))
		printf '%s"%s":{"url":"%s","size":%s,"sha256":"%s"}' "$sep" "$b" "$outurl$b" "$sz" \
			"$(sha256sum "$f" | cut -d' ' -f1)" >> "$CTL/uploaded"
		sep=,
	done
	return 0
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
		rm -rf "$CTL"
		mkdir -p "$CTL"
		printf '%s\n' "${body%"$CR"}" > "$CTL/item.json"
		if ! awk -f "${VMTOOL_AGENT_ITEM_AWK:-/usr/lib/vmtool/agent-item.awk}" "$CTL/item.json" > "$CTL/job.sh" 2> "$CTL/why"; then
			bury_note "$jid" null "$CTL/why"
			continue
		fi
		hdr() { sed -n "s/^#$1 //p" "$CTL/job.sh"; }
		id=$(hdr id)
		tmo=$(hdr timeout)
		max=$(hdr max)
		maxin=$(hdr maxin)
		maxoutb=$(hdr maxout)
		outurl=$(hdr outurl)
		job_stats "$jid"
		lost=$((reserves - 1 - releases))
		if [ "$lost" -ge "$maxatt" ]; then
			echo "failed $lost times; last: its VM or worker died or its TTR expired" > "$CTL/why"
			bury_note "$jid" "\"$id\"" "$CTL/why" "$lost"
			continue
		fi
		scratch_up "$(hdr scratch)"
		: > "$CTL/stdout"
		: > "$CTL/stderr"
		bytes_in=0
		bytes_out=0
		tx=0
		rc=null
		took=0
		st=error
		ta=$(uptime_s)
		fetch_inputs
		tb=$(uptime_s)
		tx=$(awk -v a="$ta" -v b="$tb" 'BEGIN { printf "%.2f", b - a }')
		if [ ! -s "$CTL/err" ]; then
			t0=$(uptime_s)
			(
				cd "$WORK" && VMTOOL_OUTDIR="$WORK/out" TMPDIR="$WORK" timeout "$tmo" sh "$CTL/job.sh" < /dev/null > "$CTL/stdout" 2> "$CTL/stderr"
				echo $? > "$CTL/rc"
			) &
			n=0
			while [ ! -s "$CTL/rc" ]; do
				sleep 0.1
				n=$((n + 1))
				[ $((n % 100)) -eq 0 ] && bs "touch $jid"
			done
			rc=$(cat "$CTL/rc")
			t1=$(uptime_s)
			took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
			st=ok
			[ "$rc" -ne 0 ] && st=failed
			if [ "$rc" -eq 124 ] || [ "$rc" -eq 143 ]; then
				awk -v a="$took" -v t="$tmo" 'BEGIN { exit !(a >= t - 1) }' && st=timeout
			fi
			scratch_used
			if [ $((used + 65536)) -ge "$(hdr scratch)" ]; then
				echo "the item filled its scratch space (${used} of $(hdr scratch) bytes, limits.scratch_bytes)" > "$CTL/err"
			elif [ -n "$outurl" ]; then
				ta=$(uptime_s)
				put_outputs
				tb=$(uptime_s)
				tx=$(awk -v a="$ta" -v b="$tb" -v t="$tx" 'BEGIN { printf "%.2f", t + b - a }')
			fi
			[ -s "$CTL/err" ] && st=error
		fi
		make_result "$max" 1 false
		bs_put "$tube.results" "$CTL/result.json"
		case "$put_resp" in
		INSERTED*) ;;
		*)
			# Too big for the server (or refused): send the tails only, marked truncated.
			make_result 4096 0 true
			bs_put "$tube.results" "$CTL/result.json"
			;;
		esac
		case "$put_resp" in
		INSERTED*)
			bs "delete $jid"
			say "DID $id $st $rc $took"
			;;
		*)
			echo "the result could not be stored ($put_resp)" > "$CTL/why"
			bury_note "$jid" "\"$id\"" "$CTL/why" "$lost"
			;;
		esac
		work_down
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
	ITEM) run_item "$2" "$3" "$4" "$5" "$6" || break ;;
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
