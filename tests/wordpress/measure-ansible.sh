#!/bin/sh
# Times the playbook against a fresh container of BASE for each connection
# plugin and pipelining setting, then a second (idempotent) run on the same
# container, which mostly measures the per-task cost of the connection.
# Usage: tests/wordpress/measure-ansible.sh [BASE]   (run from the repository root)
set -eu
BASE=${1:-wpimg-dev/debian:bookworm}
WORK=$(mktemp -d /tmp/wpimg-measure.XXXXXX)
trap 'docker rm -f $(cat "$WORK/containers" 2>/dev/null) >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
echo '{}' >"$WORK/extra_vars.json"
printf '%-32s %-10s %10s %10s %s\n' connection pipelining first_s second_s second_run_changed
for connection in community.docker.docker community.docker.docker_api; do
	for pipelining in 1 0; do
		name=wpimg-measure-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
		echo "$name" >>"$WORK/containers"
		docker run -d -t -i --name "$name" "$BASE" /bin/sh >/dev/null
		printf '[all]\ndefault ansible_connection=%s ansible_host=%s\n' "$connection" "$name" >"$WORK/inventory"
		times=
		for run in 1 2; do
			t=$(date +%s.%N)
			ANSIBLE_PIPELINING=$pipelining ansible-playbook -i "$WORK/inventory" playbooks/wordpress.yml \
				-e @"$WORK/extra_vars.json" >"$WORK/run-$name-$run.log" 2>&1 ||
				{ tail -30 "$WORK/run-$name-$run.log"; exit 1; }
			times="$times $(printf '%.1f' "$(echo "$(date +%s.%N) - $t" | bc)")"
		done
		changed=$(sed -n 's/.*changed=\([0-9]*\).*/\1/p' "$WORK/run-$name-2.log")
		# shellcheck disable=SC2086
		printf '%-32s %-10s %10s %10s %s\n' "$connection" "$pipelining" $times "$changed"
		docker rm -f "$name" >/dev/null
	done
done
