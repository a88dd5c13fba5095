// The evidence viewer: fetches a CyclesEvidence envelope and the server's JWK Set (both public) and
// verifies the envelope here, in the browser, with the spec's algorithm (docs/evidence.md): the shape,
// the content id (sha256 of the RFC 8785 canonical bytes with evidence_id and signature ""), the
// signer's authority (did:cycles bound to server_id, one key valid at issued_at_ms) and the Ed25519
// signature, with WebCrypto. Nothing is trusted from the server's own say-so.
// WebCrypto exists only in a secure context (HTTPS or localhost): elsewhere (plain HTTP from another
// host), or in a browser whose WebCrypto lacks Ed25519, the page falls back to vendored pure-JS
// SHA-256/SHA-512 and Ed25519 verify (@noble/hashes, @noble/ed25519: static/vendor/, refreshed by
// scripts/refresh-vendor.sh), loaded only when needed, and says which one it used.
import { get, session } from '../api.js';
import { h, clear, fmt, errorBox } from '../ui.js';
import { go } from '../main.js';

const SCHEMA_VERSION = 'cycles-evidence/v0.1';
const ARTIFACTS = ['decide', 'reserve', 'commit', 'release', 'error'];
const MEMBERS = ['schema_version', 'artifact_type', 'server_id', 'signer_did', 'issued_at_ms', 'payload', 'evidence_id', 'signature'];
const ERROR_CODES = ['INVALID_REQUEST', 'UNAUTHORIZED', 'FORBIDDEN', 'NOT_FOUND', 'BUDGET_EXCEEDED', 'BUDGET_FROZEN', 'BUDGET_CLOSED',
  'RESERVATION_EXPIRED', 'RESERVATION_FINALIZED', 'IDEMPOTENCY_MISMATCH', 'UNIT_MISMATCH', 'OVERDRAFT_LIMIT_EXCEEDED',
  'DEBT_OUTSTANDING', 'MAX_EXTENSIONS_EXCEEDED', 'LIMIT_EXCEEDED', 'TENANT_CLOSED', 'INTERNAL_ERROR'];
const HEX64 = /^[0-9a-f]{64}$/;
const HEX128 = /^[0-9a-f]{128}$/;
const DID = /^did:cycles:([0-9a-f]{64})#(.+)$/;
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

// RFC 8785: JSON.stringify already writes strings and numbers the JCS way (ECMAScript is the spec's
// reference); what is left is sorting object members by UTF-16 code units, which is what sort() does.
export function canonical(v) {
  if (v === null || typeof v === 'boolean') return JSON.stringify(v);
  if (typeof v === 'number') {
    if (!Number.isFinite(v)) throw new Error('NaN and Infinity have no canonical form');
    return JSON.stringify(v);
  }
  if (typeof v === 'string') {
    if (LONE_SURROGATE.test(v)) throw new Error('a string is not valid Unicode (lone surrogate)');
    return JSON.stringify(v);
  }
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (typeof v === 'object') {
    return `{${Object.keys(v).sort().map((k) => `${canonical(k)}:${canonical(v[k])}`).join(',')}}`;
  }
  throw new Error(`${typeof v} is not a JSON value`);
}

const utf8 = (s) => new TextEncoder().encode(s);
const hex = (buf) => [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, '0')).join('');
const unhex = (s) => new Uint8Array(s.match(/../g).map((x) => parseInt(x, 16)));
function b64url(s) {
  if (typeof s !== 'string' || s.includes('=') || !/^[A-Za-z0-9_-]*$/.test(s)) throw new Error('not unpadded base64url');
  const bin = atob(s.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (s.length % 4)) % 4));
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}
const INSECURE = 'this page is not a secure context (HTTPS or localhost), so the browser offers no WebCrypto';
const subtle = () => (globalThis.crypto && globalThis.crypto.subtle) || null;

const NOBLE = 'pure JavaScript (@noble/ed25519 3.2.0, @noble/hashes 2.4.0, vendored)';
let noble = null;
function pureJs() {
  noble = noble || Promise.all([import('../../vendor/noble-ed25519/index.js'), import('../../vendor/noble-hashes/sha2.js')])
    .then(([ed, sha2]) => { ed.hashes.sha512 = sha2.sha512; return { ed, sha256: sha2.sha256 }; });
  return noble;
}
async function sha256hex(text) {
  const s = subtle();
  return hex(s ? await s.digest('SHA-256', utf8(text)) : (await pureJs()).sha256(utf8(text)));
}
// -> {good, engine}. WebCrypto's Ed25519 when the browser has it; else the vendored verify, strict as
// RFC 8032 is (zip215: false: non-canonical points and small-order keys refused, as OpenSSL does).
async function ed25519Verify(key, sig, msg) {
  const s = subtle();
  let why = INSECURE;
  if (s) {
    try {
      const pub = await s.importKey('raw', key, { name: 'Ed25519' }, false, ['verify']);
      return { good: await s.verify({ name: 'Ed25519' }, pub, sig, msg), engine: 'webcrypto' };
    } catch (e) {
      why = `this browser's WebCrypto has no Ed25519 (${e.message})`;
    }
  }
  const { ed } = await pureJs();
  return { good: ed.verify(sig, msg, key, { zip215: false }), engine: 'noble', why };
}

export function shapeProblem(env) {
  if (!env || typeof env !== 'object' || Array.isArray(env)) return 'not a JSON object';
  const missing = MEMBERS.filter((k) => !(k in env));
  if (missing.length) return `missing ${missing.join(', ')}`;
  const extra = Object.keys(env).filter((k) => !MEMBERS.includes(k) && k !== 'trace_id');
  if (extra.length) return `unknown member ${extra.sort()[0]}`;
  if (env.schema_version !== SCHEMA_VERSION) return `schema_version ${env.schema_version} is not ${SCHEMA_VERSION}`;
  if (!ARTIFACTS.includes(env.artifact_type)) return `artifact_type ${env.artifact_type} is not one of ${ARTIFACTS.join(', ')}`;
  const p = env.payload;
  if (!p || typeof p !== 'object' || Array.isArray(p) || Object.keys(p).length !== 1 || !(env.artifact_type in p)) return `payload must hold exactly the key ${env.artifact_type}`;
  if (!Number.isSafeInteger(env.issued_at_ms) || env.issued_at_ms < 0) return 'issued_at_ms is not a non-negative integer';
  for (const k of ['server_id', 'signer_did']) if (typeof env[k] !== 'string' || !env[k]) return `${k} is not a string`;
  if (typeof env.evidence_id !== 'string' || !HEX64.test(env.evidence_id)) return 'evidence_id is not 64 lowercase hex digits';
  if (typeof env.signature !== 'string' || !HEX128.test(env.signature)) return 'signature is not 128 lowercase hex digits';
  if (env.artifact_type === 'error') {
    const err = p.error;
    if (!err || typeof err !== 'object' || !err.response || !ERROR_CODES.includes(err.response.error)) return 'payload.error.response.error is not an error code of the mirror';
  }
  return null;
}

// The key of the set that may have signed: the DID's hash binds server_id, its fragment names the kid,
// and exactly one Ed25519 key with that kid has a window covering issued_at_ms.
async function selectKey(jwks, env) {
  if (!jwks || !Array.isArray(jwks.keys)) return { why: 'the JWK Set has no keys array' };
  const m = DID.exec(env.signer_did);
  if (!m) return { why: `signer_did ${env.signer_did} is not did:cycles:<sha256(server_id)>#<kid>` };
  const bound = await sha256hex(env.server_id);
  if (m[1] !== bound) return { why: `signer_did does not bind to this envelope's server_id (sha256 is ${bound})` };
  const kids = jwks.keys.map((k) => k && k.kid);
  if (new Set(kids).size !== kids.length) return { why: 'the JWK Set repeats a kid' };
  const t = env.issued_at_ms;
  const found = [];
  for (const k of jwks.keys) {
    if (!k || k.kty !== 'OKP' || k.crv !== 'Ed25519' || ('alg' in k && k.alg !== 'EdDSA') || k.kid !== m[2]) continue;
    if (!Number.isSafeInteger(k.cycles_nbf_ms) || (k.cycles_exp_ms != null && !Number.isSafeInteger(k.cycles_exp_ms))) continue;
    if (!(k.cycles_nbf_ms <= t && (k.cycles_exp_ms == null || t < k.cycles_exp_ms))) continue;
    let x;
    try { x = b64url(k.x); } catch (e) { continue; }
    if (x.length === 32) found.push({ key: x, kid: k.kid, status: k.status });
  }
  if (found.length !== 1) return { why: `${found.length ? 'more than one' : 'no'} key of the JWK Set is valid for ${m[2]} at issued_at_ms ${t}` };
  return found[0];
}

// -> {ok, disposition, checks: [{name, state: pass|fail|skip, detail}]}
export async function verifyEnvelope(env, jwks) {
  const checks = [];
  const engine = { name: subtle() ? 'webcrypto' : 'noble', why: subtle() ? '' : INSECURE };
  const done = (disposition) => ({ ok: disposition === 'authentic', disposition, checks, engine });
  const skipRest = (from) => { for (const n of ['Shape', 'Canonical form (RFC 8785)', 'Content id (sha256)', 'Signer authority (JWK Set)', 'Ed25519 signature'].slice(from)) checks.push({ name: n, state: 'skip', detail: 'not reached' }); };
  const problem = shapeProblem(env);
  checks.push({ name: 'Shape', state: problem ? 'fail' : 'pass', detail: problem || `${env.artifact_type} envelope, ${SCHEMA_VERSION}` });
  if (problem) { skipRest(1); return done('malformed'); }
  let cidInput;
  let sigInput;
  try {
    cidInput = canonical({ ...env, evidence_id: '', signature: '' });
    sigInput = canonical({ ...env, signature: '' });
    checks.push({ name: 'Canonical form (RFC 8785)', state: 'pass', detail: `${utf8(sigInput).length} bytes signed` });
  } catch (e) {
    checks.push({ name: 'Canonical form (RFC 8785)', state: 'fail', detail: e.message });
    skipRest(2);
    return done('malformed');
  }
  const derived = await sha256hex(cidInput);
  if (derived !== env.evidence_id) {
    checks.push({ name: 'Content id (sha256)', state: 'fail', detail: `the envelope says ${env.evidence_id}, its content hashes to ${derived} (tampered)` });
    skipRest(3);
    return done('malformed');
  }
  checks.push({ name: 'Content id (sha256)', state: 'pass', detail: derived });
  const sel = await selectKey(jwks, env);
  if (!sel.key) {
    checks.push({ name: 'Signer authority (JWK Set)', state: 'fail', detail: sel.why });
    skipRest(4);
    return done('signer_authority_failed');
  }
  checks.push({ name: 'Signer authority (JWK Set)', state: 'pass', detail: `key ${sel.kid}${sel.status ? ` (${sel.status})` : ''} of ${env.server_id}, valid at ${fmt.time(env.issued_at_ms)}` });
  let good = false;
  try {
    const v = await ed25519Verify(sel.key, unhex(env.signature), utf8(sigInput));
    good = v.good;
    engine.name = v.engine;
    engine.why = v.why || engine.why;
  } catch (e) {
    checks.push({ name: 'Ed25519 signature', state: 'fail', detail: `this browser could not check an Ed25519 signature (${e.message})` });
    return done('unverifiable');
  }
  const by = engine.name === 'webcrypto' ? 'WebCrypto' : '@noble/ed25519';
  checks.push({ name: 'Ed25519 signature', state: good ? 'pass' : 'fail', detail: good ? `verified with ${sel.kid} (${by})` : `the signature does not verify (tampered or another key; checked with ${by})` });
  return done(good ? 'authentic' : 'signature_invalid');
}

const VERDICTS = {
  authentic: 'Authentic: content id, signer authority and Ed25519 signature verified in this browser.',
  malformed: 'Not verified: the envelope is malformed or its content does not match its id (tampered).',
  signer_authority_failed: 'Not verified: no key of the server\'s key set may have signed it.',
  signature_invalid: 'Not verified: the signature does not verify (tampered or signed by another key).',
  unverifiable: 'Not verified: this browser cannot check it.',
};

async function publicJson(path) {
  const r = await fetch(path, { cache: 'no-store', headers: { Accept: 'application/json' } });
  const text = await r.text();
  if (!r.ok) {
    let body = null;
    try { body = JSON.parse(text); } catch (e) { /* not JSON */ }
    throw new Error(r.status === 404 ? 'No envelope with this id on this server.' : (body && body.message) || `HTTP ${r.status}`);
  }
  return { text, json: JSON.parse(text) };
}

function facts(env) {
  const rows = [['Artifact', env.artifact_type], ['Issued', `${fmt.time(env.issued_at_ms)} (${fmt.ago(env.issued_at_ms)})`],
    ['Server', env.server_id], ['Signer', env.signer_did], ['Trace id', env.trace_id || '—'], ['Evidence id', env.evidence_id]];
  const body = env.payload && env.payload[env.artifact_type];
  if (body && body.reservation_id) rows.push(['Reservation', body.reservation_id]);
  if (body && body.endpoint) rows.push(['Endpoint', `${body.endpoint} → ${body.http_status}`]);
  return h('dl', { class: 'facts' }, rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', { class: 'break' }, String(v))]));
}

async function show(box, envText, source) {
  let env;
  try { env = JSON.parse(envText); } catch (e) { box.replaceChildren(errorBox(new Error(`Not JSON: ${e.message}`))); return; }
  let jwks = null;
  let jwksNote = '';
  try { jwks = (await publicJson('/v1/.well-known/cycles-jwks.json')).json; } catch (e) { jwksNote = `The key set could not be read: ${e.message}`; }
  const result = await verifyEnvelope(env, jwks || { keys: [] });
  const served = source === 'server' && typeof env === 'object' ? (() => { try { return canonical(env) === envText; } catch (e) { return false; } })() : null;
  const body = env && env.payload && env.payload[env.artifact_type];
  box.replaceChildren(...[ // replaceChildren would write a null as the text "null"
    h('div', { class: `verdict ${result.ok ? 'ok' : 'bad'}`, id: 'verdict', role: 'status', dataset: { disposition: result.disposition } }, VERDICTS[result.disposition] || result.disposition),
    h('p', { class: 'muted', id: 'crypto-engine', dataset: { engine: result.engine.name } },
      result.engine.name === 'webcrypto' ? 'Hashes and signature checked with the browser\'s WebCrypto.'
        : `Hashes and signature checked with ${NOBLE}: ${result.engine.why}.`),
    h('ol', { class: 'checks', id: 'checks' }, result.checks.map((c) => h('li', { class: c.state, dataset: { check: c.name, state: c.state } },
      h('span', { class: 'mark', 'aria-hidden': 'true' }, c.state === 'pass' ? '✓' : c.state === 'fail' ? '✗' : '–'),
      h('span', {}, h('strong', {}, `${c.name}: `), h('span', { class: 'break' }, c.detail))))),
    jwksNote ? h('p', { class: 'warn-text' }, jwksNote) : null,
    served === false ? h('p', { class: 'warn-text' }, 'The server did not send the envelope in its canonical form (it serves envelopes byte for byte as signed).') : null,
    env && typeof env === 'object' && env.server_id && !String(env.server_id).startsWith(location.origin)
      ? h('p', { class: 'muted' }, `The envelope names ${env.server_id}; the key set was read from this server (${location.origin}).`) : null,
    env && typeof env === 'object' ? facts(env) : null,
    body && body.request ? h('section', { class: 'card wide' }, h('h2', {}, 'Request as submitted'), h('pre', { class: 'json' }, JSON.stringify(body.request, null, 2))) : null,
    body && body.response ? h('section', { class: 'card wide' }, h('h2', {}, 'Answer as given'), h('pre', { class: 'json' }, JSON.stringify(body.response, null, 2))) : null,
    h('details', {}, h('summary', {}, 'The envelope'), h('pre', { class: 'json envelope', id: 'envelope-json' }, JSON.stringify(env, null, 2))),
    jwks ? h('details', {}, h('summary', {}, 'The key set'), h('pre', { class: 'json' }, JSON.stringify(jwks, null, 2))) : null,
  ].filter(Boolean));
}

async function fromReservation(box, rid) {
  const res = await get(`/v1/reservations/${encodeURIComponent(rid)}`);
  const ev = res.evidence || {};
  const links = Object.entries(ev).filter(([, v]) => v).map(([k, v]) => {
    const id = typeof v === 'string' ? v : v.evidence_id;
    return h('li', {}, h('a', { href: `#/evidence/${id}` }, `${k}: ${id}`));
  });
  box.replaceChildren(links.length ? h('div', {}, h('p', {}, `Evidence of reservation ${rid}:`), h('ul', { id: 'reservation-evidence' }, links))
    : h('p', { class: 'muted' }, `Reservation ${rid} has no evidence (the server runs without --evidence, or it predates it).`));
}

export async function render(main, r) {
  const id = r.id || '';
  const rid = r.params.get('reservation') || '';
  const idIn = h('input', { id: 'evidence-id', value: id, placeholder: '64 hex digits, or an evidence URL', autocomplete: 'off', spellcheck: 'false' });
  const paste = h('textarea', { id: 'evidence-paste', rows: 4, placeholder: '{"artifact_type": …}' });
  const box = h('div', { id: 'evidence-box' });
  const open = () => {
    const raw = idIn.value.trim();
    const m = /([0-9a-f]{64})\/?$/.exec(raw);
    if (!m) { box.replaceChildren(errorBox(new Error('An evidence id is 64 lowercase hex digits (or a URL ending in one).'))); return; }
    go('evidence', null, m[1]);
  };
  clear(main, h('div', { class: 'page-head' }, h('h1', {}, 'Evidence')),
    h('p', { class: 'muted' }, 'Signed receipts of the server\'s decisions (CyclesEvidence). This page fetches the envelope and the server\'s public key set and checks them itself: canonical form, content id, signer and Ed25519 signature.'),
    h('form', { class: 'filters', 'aria-label': 'Open an envelope', onsubmit: (e) => { e.preventDefault(); open(); } },
      h('div', { class: 'filter wide' }, h('label', { for: 'evidence-id' }, 'Evidence id or URL'), idIn),
      h('button', { type: 'submit', class: 'primary' }, 'Fetch and verify')),
    h('details', {}, h('summary', {}, 'Verify a saved envelope instead'),
      h('form', { class: 'form', 'aria-label': 'Verify a saved envelope', onsubmit: (e) => { e.preventDefault(); show(box, paste.value, 'pasted'); } },
        h('div', { class: 'field' }, h('label', { for: 'evidence-paste' }, 'Envelope JSON'), paste),
        h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'verify-pasted' }, 'Verify this envelope')))),
    box);
  try {
    if (id) {
      box.replaceChildren(h('p', { class: 'muted' }, 'Fetching and verifying…'));
      const { text } = await publicJson(`/v1/evidence/${encodeURIComponent(id)}`);
      await show(box, text, 'server');
    } else if (rid && (session.isAdmin || session.can('view_reservations'))) {
      await fromReservation(box, rid);
    }
  } catch (e) { box.replaceChildren(errorBox(e)); }
}
