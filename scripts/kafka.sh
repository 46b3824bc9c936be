#!/usr/bin/env bash
# A single-node Apache Kafka broker (KRaft mode) on loopback, from Kafka's own jars on Maven Central.
#
#   scripts/kafka.sh start     fetch the broker if needed, format its storage once, start it, wait until it serves
#   scripts/kafka.sh stop      stop it (SIGTERM, then SIGKILL after 30 s) and keep its data
#   scripts/kafka.sh status    exit 0 when it is running
#   scripts/kafka.sh fetch     only fetch the jars into .kafka/libs
#
# Environment:
#   ADVX_KAFKA_DIR            data, logs and pid file (default: data/kafka)
#   ADVX_KAFKA_PORT           PLAINTEXT listener on 127.0.0.1 (default 9092); the controller uses PORT+1
#   ADVX_KAFKA_SASL_PASSWORD  when set, a SASL_PLAINTEXT listener on PORT+2 accepts user "advx" with it
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
libs="$root/.kafka/libs"
dir="${ADVX_KAFKA_DIR:-$root/data/kafka}"
port="${ADVX_KAFKA_PORT:-9092}"
controller_port=$((port + 1))
sasl_port=$((port + 2))
pidfile="$dir/broker.pid"

fetch() {
  local stamp="$root/.kafka/.fetched-$(sha1sum "$root/scripts/kafka/pom.xml" | cut -c1-12)"
  [ -f "$stamp" ] && return
  echo "kafka: fetching the broker jars with Maven" >&2
  rm -rf "$libs" && mkdir -p "$libs"
  mvn -q -B -f "$root/scripts/kafka/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs" >&2
  touch "$stamp"
}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

write_config() {
  local listeners="PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port"
  local advertised="PLAINTEXT://127.0.0.1:$port"
  local protocols="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
  if [ -n "${ADVX_KAFKA_SASL_PASSWORD:-}" ]; then
    listeners="$listeners,SASL_PLAINTEXT://127.0.0.1:$sasl_port"
    advertised="$advertised,SASL_PLAINTEXT://127.0.0.1:$sasl_port"
    protocols="$protocols,SASL_PLAINTEXT:SASL_PLAINTEXT"
  fi
  umask 077  # the file may hold the SASL password
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
controller.listener.names=CONTROLLER
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$protocols
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/log
num.partitions=3
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
  if [ -n "${ADVX_KAFKA_SASL_PASSWORD:-}" ]; then
    cat >> "$dir/server.properties" <<PROPS
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_advx="$ADVX_KAFKA_SASL_PASSWORD";
PROPS
  fi
  cat > "$dir/log4j2.properties" <<PROPS
appender.file.type=File
appender.file.name=file
appender.file.fileName=$dir/server.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=file
logger.kafka.name=kafka
logger.kafka.level=INFO
logger.state.name=state.change.logger
logger.state.level=WARN
PROPS
}

start() {
  fetch
  if running; then echo "kafka: already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; return; fi
  mkdir -p "$dir/log"
  write_config
  local java=(java -Xms256m -Xmx1g -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$libs/*")
  if [ ! -f "$dir/log/meta.properties" ]; then
    local cluster_id; cluster_id=$("${java[@]}" kafka.tools.StorageTool random-uuid)
    "${java[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" >/dev/null
  fi
  nohup "${java[@]}" kafka.Kafka "$dir/server.properties" >"$dir/stdout.log" 2>&1 &
  echo $! > "$pidfile"
  for _ in $(seq 1 120); do
    if grep -q "Kafka Server started" "$dir/server.log" 2>/dev/null; then
      echo "kafka: running (pid $(cat "$pidfile")) on 127.0.0.1:$port, data in $dir"; return
    fi
    if ! running; then echo "kafka: the broker exited during start; see $dir/server.log and $dir/stdout.log" >&2; exit 1; fi
    sleep 0.5
  done
  echo "kafka: not ready after 60 s; see $dir/server.log" >&2; exit 1
}

stop() {
  running || { echo "kafka: not running"; return; }
  local pid; pid=$(cat "$pidfile")
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; echo "kafka: stopped"; return; }; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"; echo "kafka: killed after 30 s"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) running ;;
  fetch) fetch ;;
  *) echo "usage: scripts/kafka.sh start|stop|status|fetch" >&2; exit 2 ;;
esac
