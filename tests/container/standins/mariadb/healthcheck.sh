#!/bin/bash
# Stand-in for the official image's healthcheck.sh: --connect (the real server
# answers over TCP, so not the networkless one of the initialisation) and
# --innodb_initialized (InnoDB is up).
set -eo pipefail
query() {
  mariadb --defaults-extra-file=/var/lib/mysql/.my-healthcheck.cnf --protocol=tcp -h127.0.0.1 \
    --skip-column-names -e "$1"
}
for arg in "$@"; do
  case "$arg" in
    --connect) query 'SELECT 1' >/dev/null ;;
    --innodb_initialized)
      [ "$(query "SELECT 1 FROM information_schema.ENGINES WHERE engine='InnoDB' AND support IN ('YES','DEFAULT','ENABLED')")" = 1 ] ;;
    *) echo "healthcheck.sh: unsupported $arg" >&2; exit 2 ;;
  esac
done
