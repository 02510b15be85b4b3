#!/bin/sh
# Per-task cost of Ansible's docker connections: 30 `stat` and 10 `copy`
# tasks against one container of BASE, for each connection plugin and
# pipelining setting, ROUNDS times interleaved (the machine may be shared).
# Usage: tests/wordpress/measure-connection.sh [BASE] [ROUNDS]
set -eu
BASE=${1:-wpimg-dev/debian:bookworm}
ROUNDS=${2:-3}
WORK=$(mktemp -d /tmp/wpimg-conn.XXXXXX)
NAME=wpimg-conn-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
trap 'docker rm -f "$NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
docker run -d -t -i --name "$NAME" "$BASE" /bin/sh >/dev/null
cat >"$WORK/play.yml" <<'YAML'
- name: Connection cost
  hosts: all
  gather_facts: false
  vars:
    ansible_python_interpreter: /usr/bin/python3
  tasks:
    - name: Stat
      ansible.builtin.stat:
        path: /etc/hostname
      loop: "{{ range(30) | list }}"
    - name: Copy
      ansible.builtin.copy:
        dest: "/tmp/file{{ item }}"
        content: "{{ item }}\n"
        mode: "0644"
      loop: "{{ range(10) | list }}"
YAML
for round in $(seq "$ROUNDS"); do
	for connection in community.docker.docker community.docker.docker_api; do
		for pipelining in 1 0; do
			printf '[all]\ndefault ansible_connection=%s ansible_host=%s\n' "$connection" "$NAME" >"$WORK/inventory"
			t=$(date +%s.%N)
			ANSIBLE_PIPELINING=$pipelining ansible-playbook -i "$WORK/inventory" "$WORK/play.yml" >"$WORK/log" 2>&1 ||
				{ cat "$WORK/log"; exit 1; }
			printf '%s %s %s %.2f\n' "$round" "$connection" "$pipelining" "$(echo "$(date +%s.%N) - $t" | bc)"
			docker exec "$NAME" sh -c 'rm -f /tmp/file*'
		done
	done
done
