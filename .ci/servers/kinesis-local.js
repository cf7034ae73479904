// kinesis-local (a Node build of kinesis-mock: resharding, ChildShards, ShardFilter,
// enhanced fan-out) on 127.0.0.1 only.
//
// Usage:
//   NODE_PATH="$HEALER_NODE_MODULES" node .ci/servers/kinesis-local.js PORT [--shard-limit N]
//
// NODE_PATH must name the node_modules folder that .ci/test installs from .ci/node
// (exported there as HEALER_NODE_MODULES). PORT is the plain-HTTP port; 0 picks a free one.
// Once the server answers a Kinesis request, prints exactly one line `listening <port>` to
// stdout; the emulator's own log goes to stderr. Runs until SIGTERM or SIGINT, then exits 0.
//
// kinesis-mock always opens a TLS port too (self-signed, from the package's server.json):
// it gets a free port on 127.0.0.1 and is not used. Every listening socket of this process
// is forced onto 127.0.0.1 (kinesis-mock itself would bind all interfaces).
//
// Stream, shard and consumer operations take effect at once: each *_DURATION variable below
// defaults to 0ms here (kinesis-mock's own default is 500ms); one set in the environment
// wins. Still poll DescribeStreamSummary for ACTIVE. --shard-limit (else SHARD_LIMIT,
// else 1000) is the account-wide shard limit. LOG_LEVEL defaults to WARN.
'use strict'

const net = require('net')
const http = require('http')
const path = require('path')

const LOOPBACK = '127.0.0.1'
const DURATIONS = [
  'CREATE_STREAM_DURATION',
  'DELETE_STREAM_DURATION',
  'REGISTER_STREAM_CONSUMER_DURATION',
  'DEREGISTER_STREAM_CONSUMER_DURATION',
  'START_STREAM_ENCRYPTION_DURATION',
  'STOP_STREAM_ENCRYPTION_DURATION',
  'MERGE_SHARDS_DURATION',
  'SPLIT_SHARD_DURATION',
  'UPDATE_SHARD_COUNT_DURATION',
  'UPDATE_STREAM_MODE_DURATION',
]
const READY_TIMEOUT_MS = 60000

const stdoutWrite = process.stdout.write.bind(process.stdout)
// kinesis-mock (a cats-effect app) replaces process.exit with a graceful shutdown that takes
// seconds; with nothing persisted there is nothing to save, so exit at once.
const exitNow = process.exit.bind(process)

function usage(msg) {
  process.stderr.write(`kinesis-local.js: ${msg}\n` +
    'usage: node kinesis-local.js PORT [--shard-limit N]\n')
  process.exit(2)
}

function intArg(text, what) {
  if (!/^[0-9]+$/.test(String(text))) usage(`${what} must be a non-negative integer, got ${text}`)
  return Number(text)
}

const args = process.argv.slice(2)
if (args.length < 1) usage('missing PORT')
const requestedPort = intArg(args[0], 'PORT')
if (requestedPort > 65535) usage('PORT out of range')
let shardLimit = process.env.SHARD_LIMIT || '1000'
for (let i = 1; i < args.length; i += 2) {
  if (i + 1 >= args.length) usage(`missing value for ${args[i]}`)
  if (args[i] === '--shard-limit') shardLimit = String(intArg(args[i + 1], '--shard-limit'))
  else usage(`unknown option ${args[i]}`)
}

let mainJs
let certJson
try {
  mainJs = require.resolve('kinesis-local/main.js')
  certJson = path.join(path.dirname(mainJs), 'server.json')
} catch (e) {
  usage(`cannot find kinesis-local (${e.message}); set NODE_PATH to the installed node_modules`)
}

function fail(msg) {
  process.stderr.write(`kinesis-local.js: ${msg}\n`)
  exitNow(1)
}

// The plain port, once chosen, and a promise that settles when this process itself is bound
// to it (so that a readiness probe can never be answered by another process on that port).
let plainPort = null
let plainBound
const plainListening = new Promise((resolve) => { plainBound = resolve })

// Every TCP listen of this process goes to 127.0.0.1, whatever host (or none) it asked for.
const originalListen = net.Server.prototype.listen
net.Server.prototype.listen = function (...a) {
  const server = this
  server.once('listening', () => {
    const addr = server.address()
    if (addr && typeof addr === 'object' && addr.port === plainPort) plainBound()
  })
  const first = a[0]
  if (first !== null && typeof first === 'object') {
    if (first.path === undefined && first.fd === undefined && first.handle === undefined &&
        first._handle === undefined) {
      a[0] = Object.assign({}, first, { host: LOOPBACK, ipv6Only: false })
    }
  } else if (typeof first === 'number' || (typeof first === 'string' && /^[0-9]+$/.test(first))) {
    const rest = a.slice(1)
    if (typeof rest[0] === 'string' || rest[0] === undefined || rest[0] === null) rest.shift()
    a = [Number(first), LOOPBACK, ...rest]
  } else if (first === undefined || typeof first === 'function') {
    a = [0, LOOPBACK, ...a.filter((x) => typeof x === 'function')]
  }
  return originalListen.apply(this, a)
}

// A free port on 127.0.0.1, for when the caller passed 0.
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer()
    s.on('error', reject)
    originalListen.call(s, 0, LOOPBACK, () => {
      const p = s.address().port
      s.close(() => resolve(p))
    })
  })
}

// One ListStreams call; resolves true on HTTP 200.
function probe(port) {
  return new Promise((resolve) => {
    const body = '{}'
    const req = http.request({
      host: LOOPBACK,
      port,
      method: 'POST',
      path: '/',
      timeout: 2000,
      headers: {
        'Content-Type': 'application/x-amz-json-1.1',
        'Content-Length': Buffer.byteLength(body),
        'X-Amz-Target': 'Kinesis_20131202.ListStreams',
        'X-Amz-Date': '20260101T000000Z',
        Authorization: 'AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kinesis/aws4_request, ' +
          'SignedHeaders=host;x-amz-date, Signature=0',
      },
    }, (res) => {
      res.resume()
      res.on('end', () => resolve(res.statusCode === 200))
      res.on('error', () => resolve(false))
    })
    req.on('timeout', () => req.destroy())
    req.on('error', () => resolve(false))
    req.end(body)
  })
}

async function waitReady(port) {
  const deadline = Date.now() + READY_TIMEOUT_MS
  while (Date.now() < deadline) {
    if (await probe(port)) return
    await new Promise((r) => setTimeout(r, 50))
  }
  fail(`no answer on 127.0.0.1:${port} after ${READY_TIMEOUT_MS} ms`)
}

function stop() {
  exitNow(0)
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)

async function main() {
  const port = requestedPort === 0 ? await freePort() : requestedPort
  plainPort = port
  for (const name of DURATIONS) {
    if (!process.env[name]) process.env[name] = '0ms'
  }
  process.env.KINESIS_MOCK_PLAIN_PORT = String(port)
  process.env.KINESIS_MOCK_TLS_PORT = '0'
  process.env.SHARD_LIMIT = shardLimit
  if (!process.env.KINESIS_MOCK_CERT_PATH) process.env.KINESIS_MOCK_CERT_PATH = certJson
  if (!process.env.LOG_LEVEL) process.env.LOG_LEVEL = 'WARN'
  if (!process.env.ROOT_LOG_LEVEL) process.env.ROOT_LOG_LEVEL = 'ERROR'
  // Never read or write a data file in the working directory.
  process.env.SHOULD_PERSIST_DATA = 'false'
  process.env.LOAD_DATA_IF_EXISTS = 'false'

  // stdout carries only our `listening` line; the emulator's log goes to stderr.
  process.stdout.write = process.stderr.write.bind(process.stderr)
  require(mainJs)
  const bound = await Promise.race([
    plainListening.then(() => true),
    new Promise((r) => setTimeout(() => r(false), READY_TIMEOUT_MS)),
  ])
  if (!bound) fail(`did not bind 127.0.0.1:${port} within ${READY_TIMEOUT_MS} ms`)
  await waitReady(port)
  stdoutWrite(`listening ${port}\n`)
}

main().catch((e) => fail(e.stack || String(e)))
