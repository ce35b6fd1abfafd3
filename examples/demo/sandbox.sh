#!/usr/bin/env bash
# Runs inside the sandbox (cleanwall run ... -- bash sandbox.sh): one allowed
# request, then the attempts the policy does not allow.
set -u
bin=${BIN:-bin}
pass=0
try() { # expectation, description, command...
	local want=$1 what=$2; shift 2
	local out
	if out=$("$@" 2>&1); then got=ok; else got=failed; fi
	if [ "$got" = "$want" ]; then mark="✔"; pass=$((pass + 1)); else mark="✘ UNEXPECTED"; fi
	printf '  %s %-52s %s\n' "$mark" "$what" "$( [ $got = ok ] && echo "→ ${out%%$'\n'*}" || echo "→ blocked")"
}
echo "inside the sandbox:"
try ok     "allowed: GET http://198.51.100.10:8080/"        curl -sS -m 3 http://198.51.100.10:8080/
try failed "denied:  another port (8081)"                   curl -sS -m 2 http://198.51.100.10:8081/
try failed "denied:  UDP to 198.51.100.10:9999"             "$bin/cleanwall-demo" udp 198.51.100.10:9999
try failed "denied:  ICMP echo (ping)"                      ping -c 1 -W 1 198.51.100.10
try failed "denied:  IPv6 to [2001:db8:100::10]:8080"       curl -sS -m 2 -g 'http://[2001:db8:100::10]:8080/'
[ $pass -eq 5 ]
