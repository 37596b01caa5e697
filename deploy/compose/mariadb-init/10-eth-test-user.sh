#!/bin/bash
# Sourced (not run) by the MariaDB image's entrypoint when it initialises an
# empty data directory: the entrypoint runs an executable *.sh file as its own
# process and sources any other, and only a sourced file sees its helper
# docker_process_sql. So this file must stay NOT executable (mode 0644;
# tests/test_deploy.py checks it).
# Creates the account the test suite logs in with (the `test` service): it
# may create and drop its own eth_test_* databases and nothing else. The
# password comes from the compose secret mysql-test-pass, never from here.
# The body runs in a subshell, so its `set -eu` and variables never leak into
# the entrypoint's shell (a leaked `set -u` aborts the entrypoint later on).
eth_test_user() (
  set -eu
  test_pass_file="${ETH_TEST_PASS_FILE:-/run/secrets/mysql-test-pass}"
  if [ ! -s "$test_pass_file" ]; then
    echo "10-eth-test-user: no $test_pass_file; skipping the test account" >&2
    return 0
  fi
  # Quote for a SQL string literal: double backslashes, escape single quotes.
  test_pass="$(sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g" "$test_pass_file" | tr -d '\r\n')"
  docker_process_sql --database=mysql <<SQL
CREATE USER IF NOT EXISTS 'eth_test'@'%' IDENTIFIED BY '${test_pass}';
GRANT ALL PRIVILEGES ON \`eth\\_test\\_%\`.* TO 'eth_test'@'%';
SQL
)
eth_test_user
unset -f eth_test_user
