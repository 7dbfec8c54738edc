# vmtool guest agent, direct mode: read one vmtool v1 item (compact JSON on one line) and print the
# job script for it, after three header lines "#id ID", "#timeout S", "#max BYTES". Exits 1 (message
# on stderr) on anything it cannot read. POSIX/busybox awk; tokens are consumed with match() so a
# 60 KB item is not walked character by character.

function fail(m) {
	print "vmtool-agent: bad item: " m > "/dev/stderr"
	failed = 1
	exit 1
}

function ws() {
	sub(/^[ \t\r\n]+/, "", s)
}

function hexval(h,   i, n, d) {
	n = 0
	for (i = 1; i <= length(h); i++) {
		d = index("0123456789abcdef", tolower(substr(h, i, 1)))
		if (d == 0)
			fail("bad \\u escape")
		n = n * 16 + d - 1
	}
	return n
}

function str(   raw, out, i, c, code) {
	if (!match(s, /^"([^"\\]|\\.)*"/))
		fail("bad string")
	raw = substr(s, 2, RLENGTH - 2)
	s = substr(s, RLENGTH + 1)
	out = ""
	while ((i = index(raw, "\\")) > 0) {
		out = out substr(raw, 1, i - 1)
		c = substr(raw, i + 1, 1)
		if (c == "u") {
			code = hexval(substr(raw, i + 2, 4))
			if (code < 32 || code > 126)
				fail("non-ASCII or control character escape (not supported in direct mode)")
			out = out sprintf("%c", code)
			raw = substr(raw, i + 6)
			continue
		}
		if (c == "n") out = out "\n"
		else if (c == "t") out = out "\t"
		else if (c == "r") out = out "\r"
		else if (c == "b" || c == "f") fail("control character in a string")
		else out = out c
		raw = substr(raw, i + 2)
	}
	return out raw
}

function value(path,   c, k, n) {
	ws()
	c = substr(s, 1, 1)
	if (c == "\"") {
		val[path] = str()
		return
	}
	if (c == "{") {
		s = substr(s, 2)
		ws()
		if (substr(s, 1, 1) == "}") {
			s = substr(s, 2)
			return
		}
		while (1) {
			ws()
			k = str()
			ws()
			if (substr(s, 1, 1) != ":")
				fail("expected ':'")
			s = substr(s, 2)
			value(path SUBSEP k)
			ws()
			c = substr(s, 1, 1)
			s = substr(s, 2)
			if (c == "}")
				return
			if (c != ",")
				fail("expected ',' or '}'")
		}
	}
	if (c == "[") {
		s = substr(s, 2)
		ws()
		n = 0
		if (substr(s, 1, 1) == "]") {
			s = substr(s, 2)
			count[path] = 0
			return
		}
		while (1) {
			value(path SUBSEP n)
			n++
			count[path] = n
			ws()
			c = substr(s, 1, 1)
			s = substr(s, 2)
			if (c == "]")
				return
			if (c != ",")
				fail("expected ',' or ']'")
		}
	}
	if (match(s, /^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?/) || match(s, /^(true|false|null)/)) {
		val[path] = substr(s, 1, RLENGTH)
		s = substr(s, RLENGTH + 1)
		return
	}
	fail("bad value")
}

function q(x) {
	gsub(/'/, "'\\''", x)
	return "'" x "'"
}

{ s = s $0 }

END {
	if (failed)
		exit 1
	value("")
	ws()
	if (s != "")
		fail("trailing data")
	if (val[SUBSEP "v"] != "1")
		fail("unsupported version")
	id = val[SUBSEP "id"]
	if (id !~ /^[A-Za-z0-9][A-Za-z0-9._:-]*$/ || length(id) > 128)
		fail("bad id")
	n = count[SUBSEP "cmd"]
	if (n < 1)
		fail("no cmd")
	t = val[SUBSEP "limits" SUBSEP "timeout_s"]
	m = val[SUBSEP "limits" SUBSEP "max_output"]
	mi = val[SUBSEP "limits" SUBSEP "max_input_bytes"]
	mo = val[SUBSEP "limits" SUBSEP "max_output_bytes"]
	sc = val[SUBSEP "limits" SUBSEP "scratch_bytes"]
	if (t == "")
		t = 600
	if (m == "")
		m = 8192
	if (mi == "")
		mi = 1073741824
	if (mo == "")
		mo = 1073741824
	if (sc == "")
		sc = 536870912
	if (t !~ /^[0-9]+$/ || m !~ /^[0-9]+$/ || mi !~ /^[0-9]+$/ || mo !~ /^[0-9]+$/ || sc !~ /^[0-9]+$/)
		fail("bad limits")
	ou = val[SUBSEP "output_url"]
	if (ou != "") {
		if (ou !~ /^[a-z0-9]+:\/\/[!-~]+\/$/ || index(ou, "'") || index(ou, "\\") || index(ou, "{id}") == 0)
			fail("bad output_url")
		gsub(/\{id\}/, id, ou)
	}
	print "#id " id
	print "#timeout " t
	print "#max " m
	print "#maxin " mi
	print "#maxout " mo
	print "#scratch " sc
	print "#outurl " ou
	print "set -e"
	for (p in val) {
		split(p, part, SUBSEP)
		if (part[2] != "inputs")
			continue
		name = part[3]
		if (name !~ /^[A-Za-z0-9_][A-Za-z0-9._-]*$/ || length(name) > 100)
			fail("bad input name")
		if (part[4] == "data") {
			data = val[p]
			if (data !~ /^[A-Za-z0-9+\/=]*$/)
				fail("input data is not base64")
			print "base64 -d > " q(name) " <<'VMTOOL_EOF'"
			for (i = 1; i <= length(data); i += 76)
				print substr(data, i, 76)
			print "VMTOOL_EOF"
		} else if (part[4] == "url") {
			# Fetched by the agent before the command runs: "#in NAME SHA256|- URL".
			u = val[p]
			if (u !~ /^[a-z0-9]+:\/\/[!-~]+$/ || index(u, "'") || index(u, "\\"))
				fail("bad input url")
			sh = val[SUBSEP "inputs" SUBSEP name SUBSEP "sha256"]
			if (sh == "")
				sh = "-"
			else if (sh !~ /^[0-9a-f]+$/ || length(sh) != 64)
				fail("bad input sha256")
			ins[name] = "#in " name " " sh " " u
		}
	}
	for (k in ins)
		print ins[k]
	print "set +e"
	line = "exec"
	for (i = 0; i < n; i++)
		line = line " " q(val[SUBSEP "cmd" SUBSEP i])
	print line
}
