#!/bin/sh
# Initialises the data directory on the first start of a copy (its own,
# inside {{.Dir}}), then becomes the server.
set -e
D="{{.Dir}}"
if [ ! -d "$D/data/mysql" ]; then
	mariadb-install-db --no-defaults --user=root --datadir="$D/data" \
		--auth-root-authentication-method=socket --skip-test-db >"$D/install.log" 2>&1
fi
exec /usr/sbin/mariadbd --defaults-file="$D/my.cnf"
