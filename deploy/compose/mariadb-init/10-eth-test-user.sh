#!/bin/bash
# Run once by the MariaDB image's entrypoint, when it initialises an empty
# data directory (files in /docker-entrypoint-initdb.d are sourced in order).
# Creates the account the test suite logs in with (the `test` service): it
# may create and drop its own eth_test_* databases and nothing else. The
# password comes from the compose secret mysql-test-pass, never from here.
# docker_process_sql is the entrypoint's helper that runs SQL as root.
set -eu
test_pass_file="${ETH_TEST_PASS_FILE:-/run/secrets/mysql-test-pass}"
if [ ! -s "$test_pass_file" ]; then
  echo "10-eth-test-user: no $test_pass_file; skipping the test account" >&2
  return 0 2>/dev/null || exit 0
fi
# Quote for a SQL string literal: double backslashes, escape single quotes.
test_pass="$(sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g" "$test_pass_file" | tr -d '\r\n')"
docker_process_sql --database=mysql <<SQL
CREATE USER IF NOT EXISTS 'eth_test'@'%' IDENTIFIED BY '${test_pass}';
GRANT ALL PRIVILEGES ON \`eth\\_test\\_%\`.* TO 'eth_test'@'%';
SQL
