#!/bin/sh
# Entrypoint of the redis service: redis-server with its AOF on (fsync every second) and
# maxmemory-policy noeviction (Redis' default, stated: tether refuses an evicting policy) in
# TETHER_REDIS_DATA (default /data) on TETHER_REDIS_PORT (default 6379), a password only when
# TETHER_REDIS_PASSWORD is set, through the image's docker-entrypoint.sh (which drops to the
# redis user); further arguments go to redis-server.
#
# One step more than redis-server alone, the same one tether's own LocalRedis takes
# (buffer/server.py): after a crash mid-write, Redis drops the torn transaction at the end of
# the AOF on load, but Redis 7 may cut the file inside that transaction's MULTI, and the next
# write's MULTI...EXEC appended after it makes the restart after that replay the torn half
# (fixed in the Valkey fork by valkey-io/valkey#4342). So when this start truncated the AOF,
# the AOF is rewritten from memory (BGREWRITEAOF) as soon as the server answers. The server
# logs to a file in the data dir (for that check), which is emptied at each start and echoed
# to stdout, so `docker compose logs redis` shows it as before.
set -u
data=${TETHER_REDIS_DATA:-/data}
port=${TETHER_REDIS_PORT:-6379}
log="$data/redis-server.log"
mkdir -p "$data"
: > "$log"
tail -n +1 -F "$log" 2>/dev/null &
(
    [ -n "${TETHER_REDIS_PASSWORD:-}" ] && export REDISCLI_AUTH="$TETHER_REDIS_PASSWORD"
    until redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; do sleep 0.2; done
    if grep -q "Truncating the AOF" "$log"; then
        echo "[redis-start] the AOF had a torn tail: rewriting it (BGREWRITEAOF)"
        redis-cli -p "$port" bgrewriteaof
    fi
) &
exec docker-entrypoint.sh redis-server --port "$port" --appendonly yes --appendfsync everysec \
    --maxmemory-policy noeviction --dir "$data" --logfile "$log" ${TETHER_REDIS_PASSWORD:+--requirepass "$TETHER_REDIS_PASSWORD"} "$@"
