// kinesalite (a fast in-memory Kinesis emulator) on 127.0.0.1 only.
//
// Usage:
//   NODE_PATH="$HEALER_NODE_MODULES" node .ci/servers/kinesalite.js PORT [--shard-limit N] [--stream-ms MS]
//
// NODE_PATH must name the node_modules folder that .ci/test installs from .ci/node
// (exported there as HEALER_NODE_MODULES). PORT 0 picks a free port.
// Once the server accepts connections, prints exactly one line `listening <port>` to stdout;
// everything else goes to stderr. Runs until SIGTERM or SIGINT, then exits with status 0.
//
// Streams go from CREATING/UPDATING/DELETING to their next state right after the request
// (--stream-ms, default 0; kinesalite's own default is 500 ms). Still poll
// DescribeStreamSummary for ACTIVE: the change lands just after CreateStream answers.
// --shard-limit (default 1000) is the account-wide shard limit across all streams.
// kinesalite needs an Authorization header on every request (any well-formed SigV4 one).
'use strict'

function usage(msg) {
  process.stderr.write(`kinesalite.js: ${msg}\n` +
    'usage: node kinesalite.js PORT [--shard-limit N] [--stream-ms MS]\n')
  process.exit(2)
}

function intArg(text, what) {
  if (!/^[0-9]+$/.test(String(text))) usage(`${what} must be a non-negative integer, got ${text}`)
  return Number(text)
}

const args = process.argv.slice(2)
if (args.length < 1) usage('missing PORT')
const port = intArg(args[0], 'PORT')
if (port > 65535) usage('PORT out of range')
let shardLimit = 1000
let streamMs = 0
for (let i = 1; i < args.length; i += 2) {
  if (i + 1 >= args.length) usage(`missing value for ${args[i]}`)
  if (args[i] === '--shard-limit') shardLimit = intArg(args[i + 1], '--shard-limit')
  else if (args[i] === '--stream-ms') streamMs = intArg(args[i + 1], '--stream-ms')
  else usage(`unknown option ${args[i]}`)
}

let kinesalite
try {
  kinesalite = require('kinesalite')
} catch (e) {
  usage(`cannot load kinesalite (${e.message}); set NODE_PATH to the installed node_modules`)
}

const server = kinesalite({
  createStreamMs: streamMs,
  deleteStreamMs: streamMs,
  updateStreamMs: streamMs,
  shardLimit,
})

server.on('error', (e) => {
  process.stderr.write(`kinesalite.js: ${e.stack || e}\n`)
  process.exit(1)
})

server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`)
})

function stop() {
  process.exit(0)
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
