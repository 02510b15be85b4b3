#!/bin/sh
# End-to-end check of the WordPress image, done by hand the way wpimg builds
# it (the lead turns this into the Rust end-to-end test that runs wpimg):
#   1. a container of the base with /bin/sh as keep-alive (tty + stdin open)
#   2. ansible-playbook over the docker connection, inventory host `default`
#   3. docker commit with the image config of image.yaml
#   4. MariaDB on the host, reached through its unix socket mounted into the
#      container (no TCP port outside 127.0.0.1, parallel-safe)
#   5. run the image: /healthz, /healthz/php, /healthz/php?db=1, install
#      WordPress over HTTP, find the title on the front page
#   6. docker stop (SIGTERM) must end within 10 s
#   7. the DB password must appear neither in the image nor in the container
#
# Needs: docker, ansible (community.docker), mariadb-server (mariadbd,
# mariadb-install-db, mariadb), curl. Run from the repository root.
#
# Environment:
#   BASE=wpimg-dev/debian:bookworm   base image (must exist locally)
#   CONNECTION=community.docker.docker   or community.docker.docker_api
#   ANSIBLE_PIPELINING=1             passed through to ansible-playbook
#   KEEP=1                           keep the image, containers and database
set -eu

BASE=${BASE:-wpimg-dev/debian:bookworm}
CONNECTION=${CONNECTION:-community.docker.docker}
export ANSIBLE_PIPELINING=${ANSIBLE_PIPELINING:-1}
ID=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
BUILD=wpimg-e2e-build-$ID
APP=wpimg-e2e-app-$ID
IMAGE=wpimg-e2e/wordpress:$ID
WORK=$(mktemp -d /tmp/wpimg-e2e.XXXXXX)
DB_PASSWORD="e2e-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
TITLE="wpimg e2e $ID"
MARIADB_PID=

say() { printf '== %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc; }

cleanup() {
	[ "${KEEP:-}" = 1 ] && { say "kept: $BUILD $APP $IMAGE $WORK"; return; }
	docker rm -f "$BUILD" "$APP" >/dev/null 2>&1 || true
	docker rmi "$IMAGE" >/dev/null 2>&1 || true
	[ -n "$MARIADB_PID" ] && kill "$MARIADB_PID" 2>/dev/null && wait "$MARIADB_PID" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

for tool in docker ansible-playbook mariadbd mariadb-install-db mariadb curl bc; do
	command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install docker.io ansible mariadb-server curl bc)"
done

say "build container from $BASE"
docker run -d -t -i --name "$BUILD" "$BASE" /bin/sh >/dev/null

printf '[all]\ndefault ansible_connection=%s ansible_host=%s\n' "$CONNECTION" "$BUILD" >"$WORK/inventory"
echo '{}' >"$WORK/extra_vars.json"

say "ansible-playbook (connection $CONNECTION, pipelining $ANSIBLE_PIPELINING)"
t=$(now)
ansible-playbook -i "$WORK/inventory" playbooks/wordpress.yml -e @"$WORK/extra_vars.json" \
	>"$WORK/ansible.log" 2>&1 || { tail -50 "$WORK/ansible.log"; fail "ansible-playbook failed"; }
say "ansible-playbook took $(elapsed "$t") s"
grep -A2 'PLAY RECAP' "$WORK/ansible.log" >&2
grep -A1 'Install Python when the base image lacks it' "$WORK/ansible.log" | tail -1 | sed 's/^/== bootstrap: /' >&2

say "commit"
docker commit \
	--change 'ENTRYPOINT ["/usr/local/bin/wordpress-entrypoint"]' \
	--change 'CMD ["supervisord", "-n", "-c", "/etc/supervisor/supervisord.conf"]' \
	--change 'EXPOSE 80' \
	--change 'VOLUME ["/var/lib/wordpress/wp-content"]' \
	--change 'WORKDIR /usr/share/wordpress' \
	--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
	"$BUILD" "$IMAGE" >/dev/null
docker rm -f "$BUILD" >/dev/null
say "layer size (uncompressed, docker history): $(docker history --format '{{.Size}}' "$IMAGE" | head -1)"

say "MariaDB on a unix socket"
mkdir -p "$WORK/db" "$WORK/sock"
chmod 755 "$WORK" "$WORK/sock"
mariadb-install-db --no-defaults --datadir="$WORK/db" --user=root \
	--auth-root-authentication-method=socket --skip-test-db >"$WORK/mariadb-install.log" 2>&1 ||
	fail "mariadb-install-db failed: $WORK/mariadb-install.log"
mariadbd --no-defaults --datadir="$WORK/db" --socket="$WORK/sock/mysqld.sock" \
	--pid-file="$WORK/mariadbd.pid" --skip-networking --user=root >"$WORK/mariadbd.log" 2>&1 &
MARIADB_PID=$!
i=0
until mariadb --socket="$WORK/sock/mysqld.sock" -e 'SELECT 1' >/dev/null 2>&1; do
	i=$((i + 1)); [ $i -lt 60 ] || fail "mariadbd did not start: $WORK/mariadbd.log"; sleep 0.5
done
mariadb --socket="$WORK/sock/mysqld.sock" <<SQL
CREATE DATABASE wordpress;
CREATE USER 'wordpress'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON wordpress.* TO 'wordpress'@'localhost';
SQL

say "run the image (password through WORDPRESS_DB_PASSWORD_FILE, no salts: generated)"
printf '%s\n' "$DB_PASSWORD" >"$WORK/db_password"
chmod 644 "$WORK/db_password"
started=$(now)
docker run -d --name "$APP" -p 127.0.0.1::80 \
	-v "$WORK/sock:/run/mysqld-host" \
	-v "$WORK/db_password:/run/secrets/db_password:ro" \
	-e WORDPRESS_DB_HOST=localhost:/run/mysqld-host/mysqld.sock \
	-e WORDPRESS_DB_USER=wordpress \
	-e WORDPRESS_DB_NAME=wordpress \
	-e WORDPRESS_DB_PASSWORD_FILE=/run/secrets/db_password \
	"$IMAGE" >/dev/null
URL="http://$(docker port "$APP" 80/tcp | head -1)"
i=0
until curl -fsS "$URL/healthz" >/dev/null 2>&1; do
	i=$((i + 1)); [ $i -lt 60 ] || { docker logs "$APP"; fail "no /healthz"; }; sleep 0.5
done
until curl -fsS "$URL/healthz/php" >/dev/null 2>&1; do
	i=$((i + 1)); [ $i -lt 60 ] || { docker logs "$APP"; fail "no /healthz/php"; }; sleep 0.5
done
say "ready $(elapsed "$started") s after docker run"
body=$(curl -fsS "$URL/healthz") && [ "$body" = ok ] || fail "/healthz: $body"
body=$(curl -fsS "$URL/healthz/php") && case $body in "ok php "*) ;; *) fail "/healthz/php: $body" ;; esac
body=$(curl -fsS "$URL/healthz/php?db=1") && case $body in *database) ;; *) fail "/healthz/php?db=1: $body" ;; esac
say "/healthz, /healthz/php, /healthz/php?db=1 answer ($body)"
docker exec "$APP" wordpress-healthcheck || fail "wordpress-healthcheck failed"

say "processes"
docker exec "$APP" ps -eo user,pid,ppid,args >&2 || true
docker exec "$APP" sh -c 'ps -eo user,args | grep -E "(nginx|php-fpm).*(worker|pool)" | grep -v grep | grep -q "^root"' &&
	fail "a worker runs as root"

say "install WordPress over HTTP"
curl -fsS -o /dev/null "$URL/wp-admin/install.php" || fail "install.php does not answer"
curl -fsS -o "$WORK/install.html" "$URL/wp-admin/install.php?step=2" \
	--data-urlencode "weblog_title=$TITLE" \
	--data-urlencode "user_name=admin" \
	--data-urlencode "admin_password=e2e-admin-password" \
	--data-urlencode "admin_password2=e2e-admin-password" \
	--data-urlencode "admin_email=admin@example.com" \
	--data-urlencode "pw_weak=1" \
	--data-urlencode "blog_public=0" || fail "install step 2 failed"
grep -q 'Success!' "$WORK/install.html" || { cat "$WORK/install.html"; fail "installation did not succeed"; }
curl -fsS "$URL/" >"$WORK/front.html" || fail "front page failed"
grep -q "$TITLE" "$WORK/front.html" || fail "title not on the front page"
say "front page shows \"$TITLE\""
curl -fsS -o /dev/null "$URL/wp-login.php" || fail "wp-login.php failed"

say "container log"
docker logs "$APP" >"$WORK/app.log" 2>&1
grep -q 'warning: not set, generated' "$WORK/app.log" || fail "no warning about generated salts"
grep -q '"status":200' "$WORK/app.log" || fail "no JSON access log on stdout"
grep -c . "$WORK/app.log" | xargs printf '== %s log lines\n' >&2

say "docker stop (SIGTERM)"
t=$(now)
docker stop -t 10 "$APP" >/dev/null
stop_time=$(elapsed "$t")
code=$(docker inspect -f '{{.State.ExitCode}}' "$APP")
say "stopped in $stop_time s, exit code $code"
[ "$(echo "$stop_time < 10" | bc)" = 1 ] || fail "stop took $stop_time s (SIGKILL after 10 s)"
[ "$code" = 0 ] || fail "exit code $code"
docker logs "$APP" 2>&1 | tail -6 >&2

say "the password appears in no layer and not on the container's disk"
docker save "$IMAGE" -o "$WORK/image.tar"
mkdir "$WORK/image"
tar -C "$WORK/image" -xf "$WORK/image.tar"
found=0
for layer in "$WORK"/image/*/layer.tar; do
	tar -xOf "$layer" 2>/dev/null | grep -aqF "$DB_PASSWORD" && { echo "in $layer" >&2; found=1; }
done
docker export "$APP" | tar -xOf - 2>/dev/null | grep -aqF "$DB_PASSWORD" && { echo "in the container's filesystem" >&2; found=1; }
[ $found = 0 ] || fail "the database password was written to disk"
layer=$WORK/image/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["Layers"][-1])' "$WORK/image/manifest.json")
say "provisioned layer: $(stat -c %s "$layer") bytes tar, $(gzip -6 -c "$layer" | wc -c) bytes gzip -6"
echo "1 passed, 0 failed"
