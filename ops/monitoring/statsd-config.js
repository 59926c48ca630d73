/*
 * StatsD daemon (npm "statsd", run as `node stats.js statsd-config.js`)
 * for gproxy, flushing to Graphite's carbon.
 *
 * flushInterval must equal the finest retention in storage-schemas.conf
 * (10s here): a shorter one makes carbon keep only the last flush of each
 * slot, a longer one leaves holes.
 */
{
  address: "127.0.0.1",          // gproxy on this host; "0.0.0.0" for a shared daemon
  port: 8125,                    // gproxy's statsd.port
  mgmt_address: "127.0.0.1",
  mgmt_port: 8126,

  graphiteHost: "127.0.0.1",
  graphitePort: 2003,            // carbon's line receiver
  flushInterval: 10000,
  backends: ["./backends/graphite"],

  // stats.counters.<name>.{count,rate}, stats.timers.<name>.*,
  // stats.gauges.<name>: the names ops/monitoring/README.md queries.
  graphite: { legacyNamespace: false, globalPrefix: "stats" },
  percentThreshold: [50, 90, 99],

  // gproxy's workers send gauges as deltas (+1/-1) that StatsD sums: it
  // must keep a gauge's value between flushes, never drop it.
  deleteGauges: false,
  // An idle timer sends nothing, rather than a latency of 0.
  deleteTimers: true
}
