// The API client and the session. The key lives in sessionStorage only (this tab, gone when it closes):
// never in the URL, never in localStorage, never logged.
const K = { key: 'cycles.key', who: 'cycles.who', started: 'cycles.started', active: 'cycles.active',
  fails: 'cycles.login_fails', failedAt: 'cycles.login_failed_at' };
export const IDLE_MS = 30 * 60 * 1000;
export const ABSOLUTE_MS = 8 * 60 * 60 * 1000;

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
    this.body = body;
  }
}

export const session = {
  get key() { return sessionStorage.getItem(K.key); },
  get who() { const w = sessionStorage.getItem(K.who); return w ? JSON.parse(w) : null; },
  get isAdmin() { const w = this.who; return !!w && w.auth_type === 'admin'; },
  get tenant() { const w = this.who; return w ? w.tenant_id : null; },
  can(cap) { const w = this.who; return !!w && !!(w.capabilities || {})[cap]; },
  touch() { if (this.key) sessionStorage.setItem(K.active, String(Date.now())); },
  expiredReason(now = Date.now()) {
    if (!this.key) return null;
    const started = Number(sessionStorage.getItem(K.started) || 0);
    const active = Number(sessionStorage.getItem(K.active) || 0);
    if (now - started > ABSOLUTE_MS) return 'Signed out: sessions last at most 8 hours.';
    if (now - active > IDLE_MS) return 'Signed out after 30 minutes without activity.';
    return null;
  },
  clear() { for (const k of [K.key, K.who, K.started, K.active]) sessionStorage.removeItem(k); },
  // login backoff: each failure doubles the wait before the next attempt (1 s … 60 s)
  backoffMs(now = Date.now()) {
    const fails = Number(sessionStorage.getItem(K.fails) || 0);
    if (!fails) return 0;
    const wait = Math.min(60000, 1000 * 2 ** (fails - 1));
    return Math.max(0, Number(sessionStorage.getItem(K.failedAt) || 0) + wait - now);
  },
  noteFailure() {
    sessionStorage.setItem(K.fails, String(Number(sessionStorage.getItem(K.fails) || 0) + 1));
    sessionStorage.setItem(K.failedAt, String(Date.now()));
  },
};

function headerFor(key, type) {
  return type === 'admin' ? { 'X-Admin-API-Key': key } : { 'X-Cycles-API-Key': key };
}

async function introspect(key, type) {
  const r = await fetch('/v1/auth/introspect', { headers: headerFor(key, type), cache: 'no-store' });
  const body = await r.json().catch(() => null);
  return { ok: r.ok, status: r.status, body };
}

// Tenant keys start with cyc_live_; anything else is tried as an operator key.
export async function login(key) {
  key = key.trim();
  const type = key.startsWith('cyc_live_') ? 'tenant' : 'admin';
  const res = await introspect(key, type);
  if (!res.ok) {
    session.noteFailure();
    if (res.status === 429) throw new ApiError(429, { message: 'Too many attempts; wait a moment and try again.' });
    throw new ApiError(res.status, { message: 'That key was not accepted.', error: res.body && res.body.error });
  }
  sessionStorage.removeItem(K.fails);
  sessionStorage.setItem(K.key, key);
  sessionStorage.setItem(K.who, JSON.stringify(res.body));
  sessionStorage.setItem(K.started, String(Date.now()));
  session.touch();
  return res.body;
}

export function logout() { session.clear(); }

function qs(query) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== '') p.set(k, String(v));
  }
  const s = p.toString();
  return s ? `?${s}` : '';
}

export async function api(method, path, { query, body, signal } = {}) {
  const who = session.who;
  if (!session.key || !who) throw new ApiError(401, { message: 'Not signed in' });
  const headers = { ...headerFor(session.key, who.auth_type), Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  session.touch();
  const r = await fetch(path + qs(query), { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store', signal });
  if (r.status === 204) return null;
  const data = await r.json().catch(() => null);
  if (!r.ok) {
    const err = new ApiError(r.status, data);
    if (r.status === 401) window.dispatchEvent(new CustomEvent('cycles:unauthorized', { detail: err.message }));
    throw err;
  }
  return data;
}

export const get = (path, query, opts) => api('GET', path, { query, ...opts });
export const post = (path, body, query) => api('POST', path, { body, query });
export const patch = (path, body, query) => api('PATCH', path, { body, query });
export const del = (path, query) => api('DELETE', path, { query });

// Follow next_cursor pages until `max` rows; onPage lets a table show rows as they arrive.
export async function getAll(path, query, field, { max = 5000, pageSize = 100, onPage, signal } = {}) {
  const rows = [];
  let cursor = null;
  let more = false;
  do {
    const page = await get(path, { ...query, limit: pageSize, cursor }, { signal });
    rows.push(...(page[field] || []));
    cursor = page.next_cursor;
    more = !!(page.has_more && cursor);
    if (onPage) onPage(rows, more);
  } while (more && rows.length < max);
  return { rows, more };
}

// Server-sent events read with fetch (EventSource cannot send the key in a header).
export function stream(path, query, onEvent, onState) {
  let stopped = false;
  let lastId = null;
  let controller = null;
  (async () => {
    while (!stopped) {
      controller = new AbortController();
      try {
        const who = session.who;
        if (!who) return;
        const headers = { ...headerFor(session.key, who.auth_type), Accept: 'text/event-stream' };
        if (lastId) headers['Last-Event-ID'] = lastId;
        const r = await fetch(path + qs(query), { headers, signal: controller.signal, cache: 'no-store' });
        if (r.status === 401) { window.dispatchEvent(new CustomEvent('cycles:unauthorized')); return; }
        if (!r.ok) { onState && onState('error'); await sleep(5000); continue; }
        onState && onState('live');
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            const chunk = buf.slice(0, i);
            buf = buf.slice(i + 2);
            let data = '';
            for (const line of chunk.split('\n')) {
              if (line.startsWith('id: ')) lastId = line.slice(4);
              else if (line.startsWith('data: ')) data += line.slice(6);
            }
            if (data) { try { onEvent(JSON.parse(data)); } catch (e) { /* a malformed frame is skipped */ } }
          }
        }
      } catch (e) {
        if (stopped) return;
      }
      onState && onState('reconnecting');
      await sleep(1000);
    }
  })();
  return () => { stopped = true; if (controller) controller.abort(); };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// An idempotency key. crypto.randomUUID exists only in a secure context; getRandomValues everywhere,
// so the actions work over plain HTTP from another host too.
export function uuid() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const x = [...b].map((v) => v.toString(16).padStart(2, '0')).join('');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}
