#!/bin/bash
# Stand-in for the official MariaDB image's entrypoint, implementing the parts
# of its documented contract docker-compose.yml uses:
#  - MARIADB_ROOT_PASSWORD, MARIADB_DATABASE, MARIADB_USER, MARIADB_PASSWORD,
#    each also as *_FILE;
#  - on an empty data directory, files in /docker-entrypoint-initdb.d in order:
#    an executable *.sh is run as its own process, any other *.sh is sourced
#    into this shell (so only a sourced file can call docker_process_sql),
#    *.sql is fed to the server;
#  - healthcheck.sh --connect --innodb_initialized.
set -eo pipefail
shopt -s nullglob

file_env() {  # file_env VAR: VAR from $VAR or from the file named by $VAR_FILE
  local var="$1" file_var="${1}_FILE"
  if [ -n "${!file_var:-}" ]; then
    export "$var"="$(cat "${!file_var}")"
  fi
}

SOCKET=/run/mysqld/mysqld.sock

docker_process_sql() {  # the official helper: SQL on stdin, as root, over the socket
  mariadb --protocol=socket --socket="$SOCKET" -uroot --password="$MARIADB_ROOT_PASSWORD" "$@"
}

sql_escape() { sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g"; }

initialise() {
  echo "entrypoint: initialising the database directory"
  mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db \
    --auth-root-authentication-method=normal >/dev/null
  mariadbd --user=mysql --skip-networking --socket="$SOCKET" &
  local pid=$!
  for _ in $(seq 60); do
    mariadb --protocol=socket --socket="$SOCKET" -uroot -e 'SELECT 1' >/dev/null 2>&1 && break
    sleep 0.5
  done
  local root_pw user_pw health_pw
  root_pw="$(printf %s "$MARIADB_ROOT_PASSWORD" | sql_escape)"
  user_pw="$(printf %s "${MARIADB_PASSWORD:-}" | sql_escape)"
  health_pw="$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
  {
    echo "ALTER USER 'root'@'localhost' IDENTIFIED BY '${root_pw}';"
    echo "CREATE USER 'root'@'%' IDENTIFIED BY '${root_pw}';"
    echo "GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
    echo "CREATE USER 'healthcheck'@'127.0.0.1' IDENTIFIED BY '${health_pw}';"
    echo "CREATE USER 'healthcheck'@'localhost' IDENTIFIED BY '${health_pw}';"
    if [ -n "${MARIADB_DATABASE:-}" ]; then
      echo "CREATE DATABASE IF NOT EXISTS \`${MARIADB_DATABASE}\`;"
    fi
    if [ -n "${MARIADB_USER:-}" ]; then
      echo "CREATE USER '${MARIADB_USER}'@'%' IDENTIFIED BY '${user_pw}';"
      [ -z "${MARIADB_DATABASE:-}" ] || echo "GRANT ALL ON \`${MARIADB_DATABASE}\`.* TO '${MARIADB_USER}'@'%';"
    fi
  } | mariadb --protocol=socket --socket="$SOCKET" -uroot --database=mysql
  printf '[client]\nuser=healthcheck\npassword=%s\n' "$health_pw" > /var/lib/mysql/.my-healthcheck.cnf
  chown mysql:mysql /var/lib/mysql/.my-healthcheck.cnf
  chmod 0600 /var/lib/mysql/.my-healthcheck.cnf
  local f
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh)
        if [ -x "$f" ]; then
          echo "entrypoint: running $f"
          "$f"
        else
          echo "entrypoint: sourcing $f"
          . "$f"
        fi
        ;;
      *.sql) echo "entrypoint: running $f"; docker_process_sql < "$f" ;;
      *) echo "entrypoint: ignoring $f" ;;
    esac
  done
  mariadb-admin --socket="$SOCKET" -uroot --password="$MARIADB_ROOT_PASSWORD" shutdown
  wait "$pid" || true
  echo "entrypoint: initialised"
}

if [ "${1:-}" = mariadbd ]; then
  file_env MARIADB_ROOT_PASSWORD
  file_env MARIADB_PASSWORD
  chown mysql:mysql /var/lib/mysql /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then
    : "${MARIADB_ROOT_PASSWORD:?MARIADB_ROOT_PASSWORD or MARIADB_ROOT_PASSWORD_FILE is required}"
    initialise
  fi
  shift
  exec mariadbd --user=mysql "$@"
fi
exec "$@"
