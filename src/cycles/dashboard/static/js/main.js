// The shell: login, navigation gated by the key's capabilities, hash routes whose query holds the
// filters (so a view can be bookmarked or shared without the key), session timeouts, theme, palette.
import { login, logout, session, stream } from './api.js';
import { h, clear, toast } from './ui.js';
import { PAGES } from './pages/index.js';

const app = document.getElementById('app');
let current = null; // {name, cleanup}
let stopLive = null;
export const live = new EventTarget(); // 'event' CustomEvents from the server's event stream

// ---- theme ----
function applyTheme(t) {
  document.documentElement.dataset.theme = t;
  try { sessionStorage.setItem('cycles.theme', t); } catch (e) { /* private mode */ }
}
applyTheme(sessionStorage.getItem('cycles.theme') ||
  (window.matchMedia && matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light'));

// ---- routing ----
export function route() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { page: parts[0] || '', id: parts[1] || null, params: new URLSearchParams(query || '') };
}

export function go(page, params, id) {
  const q = params ? new URLSearchParams(Object.entries(params).filter(([, v]) => v !== '' && v !== null && v !== undefined && v !== false)) : null;
  location.hash = `#/${page}${id ? `/${encodeURIComponent(id)}` : ''}${q && [...q].length ? `?${q}` : ''}`;
}

// Change the filters in the URL without a new history entry or a re-render.
export function setParams(params) {
  const r = route();
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== '' && v !== null && v !== undefined && v !== false) q.set(k, v);
  const hash = `#/${r.page}${r.id ? `/${encodeURIComponent(r.id)}` : ''}${[...q].length ? `?${q}` : ''}`;
  history.replaceState(null, '', hash);
}

function visiblePages() {
  return PAGES.filter((p) => !p.hidden && allowed(p));
}

function allowed(p) {
  return (!p.cap || session.can(p.cap)) && (!p.show || p.show()) && (!p.adminOnly || session.isAdmin);
}

// ---- login ----
function renderLogin(message) {
  stopStream();
  document.title = 'Sign in · Cycles';
  const input = h('input', { id: 'api-key', type: 'password', autocomplete: 'off', spellcheck: 'false', required: true,
    'aria-describedby': 'login-help' });
  const err = h('p', { class: 'form-error', role: 'alert', id: 'login-error' }, message || '');
  const btn = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  let timer = null;
  const tick = () => {
    const wait = session.backoffMs();
    btn.disabled = wait > 0;
    btn.textContent = wait > 0 ? `Wait ${Math.ceil(wait / 1000)} s` : 'Sign in';
    if (wait > 0) timer = setTimeout(tick, 250);
  };
  const form = h('form', { class: 'login-card', onsubmit: async (e) => {
    e.preventDefault();
    if (session.backoffMs() > 0) return;
    btn.disabled = true;
    err.textContent = '';
    try {
      await login(input.value);
      input.value = '';
      start();
    } catch (ex) {
      err.textContent = ex.message;
      tick();
    }
  } },
  h('div', { class: 'brand big' }, h('span', { class: 'logo', 'aria-hidden': 'true' }), 'Cycles'),
  h('p', { class: 'muted' }, 'Operator dashboard'),
  h('div', { class: 'field' }, h('label', { for: 'api-key' }, 'API key (operator or tenant)'), input,
    h('small', { id: 'login-help' }, 'Kept in this tab only (session storage) and sent as a header; never put in a URL.')),
  err, btn);
  clear(app, h('main', { class: 'login' }, form));
  tick();
  input.focus();
  return () => clearTimeout(timer);
}

// ---- shell ----
function themeButton() {
  return h('button', { type: 'button', class: 'ghost', id: 'theme-toggle', 'aria-label': 'Switch between light and dark mode',
    onclick: () => applyTheme(document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark') },
  'Light / dark');
}

function renderShell() {
  const who = session.who;
  const nav = h('nav', { 'aria-label': 'Main' }, h('ul', {}, visiblePages().map((p) =>
    h('li', {}, h('a', { href: `#/${p.name}`, id: `nav-${p.name}`, dataset: { page: p.name } }, p.title)))));
  const liveDot = h('span', { id: 'live-state', class: 'live off', title: 'Live updates' }, 'offline');
  const header = h('header', { class: 'top' },
    h('button', { type: 'button', class: 'ghost menu-toggle', 'aria-label': 'Show or hide the menu',
      onclick: () => document.body.classList.toggle('nav-open') }, '☰'),
    h('a', { class: 'brand', href: '#/' }, h('span', { class: 'logo', 'aria-hidden': 'true' }), 'Cycles'),
    h('span', { class: 'who' }, who.auth_type === 'admin' ? 'Operator' : `Tenant ${who.tenant_id}`),
    liveDot,
    h('span', { class: 'spacer' }),
    h('button', { type: 'button', class: 'ghost', id: 'palette-open', 'aria-label': 'Open the command palette (Ctrl+K)',
      onclick: () => openPalette() }, 'Commands ⌘K'),
    themeButton(),
    h('button', { type: 'button', class: 'ghost', id: 'sign-out', onclick: () => { logout(); renderLogin('Signed out.'); } }, 'Sign out'));
  const main = h('main', { id: 'view', tabindex: -1 });
  clear(app, header, h('div', { class: 'layout' }, h('aside', { class: 'side' }, nav), main));
  return main;
}

function stopStream() { if (stopLive) { stopLive(); stopLive = null; } }

function startStream() {
  stopStream();
  const path = session.isAdmin ? '/v1/admin/event-stream' : '/v1/event-stream';
  if (!session.can('view_events')) return;
  stopLive = stream(path, {}, (ev) => live.dispatchEvent(new CustomEvent('event', { detail: ev })), (state) => {
    const el = document.getElementById('live-state');
    if (el) { el.textContent = state === 'live' ? 'live' : state; el.className = `live ${state === 'live' ? 'on' : 'off'}`; }
  });
}

async function renderRoute() {
  if (!session.key) { renderLogin(); return; }
  const expired = session.expiredReason();
  if (expired) { logout(); renderLogin(expired); return; }
  let main = document.getElementById('view');
  if (!main) { main = renderShell(); startStream(); }
  if (current && current.cleanup) current.cleanup();
  const r = route();
  const pages = visiblePages();
  let page = PAGES.find((p) => p.name === r.page && allowed(p));
  if (!page) page = pages[0];
  if (!page) { clear(main, h('p', {}, 'This key may not see any page.')); return; }
  document.querySelectorAll('nav a').forEach((a) => a.toggleAttribute('aria-current', a.dataset.page === (page.parent || page.name)));
  if (a11yNav(page)) return;
  document.body.classList.remove('nav-open');
  document.title = `${page.title} · Cycles`;
  // each render writes into its own slot: a slow page still loading when the operator moves on writes
  // into a slot no longer in the document, never over the page that replaced it
  const slot = h('div', { class: 'page-slot' }, h('p', { class: 'muted' }, 'Loading…'));
  clear(main, slot);
  current = { name: page.name, cleanup: null };
  const mine = current;
  try {
    const cleanup = await page.render(slot, r);
    if (current === mine) mine.cleanup = cleanup || null; else if (cleanup) cleanup();
  } catch (e) {
    if (current === mine) clear(slot, h('div', { class: 'error-box', role: 'alert' }, e.message || String(e)));
  }
}

function a11yNav(page) {
  // a page that is not in the URL yet: write it so the back button and reloads land here
  if (!location.hash || location.hash === '#/' || location.hash === '#') {
    history.replaceState(null, '', `#/${page.name}`);
  }
  return false;
}

function start() {
  document.getElementById('view')?.remove();
  app.replaceChildren();
  renderRoute();
}

// ---- command palette (Ctrl+K / ⌘K) ----
function commands() {
  const list = visiblePages().map((p) => ({ label: `Go to ${p.title}`, run: () => go(p.name) }));
  for (const p of PAGES) if (p.commands && allowed(p)) list.push(...p.commands());
  list.push({ label: 'Toggle dark mode', run: () => applyTheme(document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark') });
  list.push({ label: 'Sign out', run: () => { logout(); renderLogin('Signed out.'); } });
  return list;
}

export function openPalette() {
  if (!session.key || document.getElementById('palette')) return;
  const all = commands();
  let sel = 0;
  const input = h('input', { type: 'text', id: 'palette-input', 'aria-label': 'Command', placeholder: 'Type a command or page…',
    autocomplete: 'off', role: 'combobox', 'aria-controls': 'palette-list', 'aria-expanded': 'true' });
  const list = h('ul', { id: 'palette-list', role: 'listbox' });
  const dlg = h('dialog', { id: 'palette', 'aria-label': 'Command palette' }, input, list);
  const close = () => { dlg.close(); dlg.remove(); };
  let shown = all;
  const draw = () => {
    const q = input.value.toLowerCase().trim();
    shown = all.filter((c) => q.split(/\s+/).every((w) => c.label.toLowerCase().includes(w)));
    sel = Math.min(sel, Math.max(0, shown.length - 1));
    list.replaceChildren(...shown.slice(0, 12).map((c, i) => h('li', { role: 'option', 'aria-selected': String(i === sel),
      onclick: () => { close(); c.run(); } }, c.label)));
  };
  input.addEventListener('input', () => { sel = 0; draw(); });
  input.addEventListener('keydown', (e) => {
    if (e.key === 'ArrowDown') { sel = Math.min(sel + 1, Math.min(shown.length, 12) - 1); draw(); e.preventDefault(); }
    if (e.key === 'ArrowUp') { sel = Math.max(sel - 1, 0); draw(); e.preventDefault(); }
    if (e.key === 'Enter' && shown[sel]) { e.preventDefault(); const c = shown[sel]; close(); c.run(); }
  });
  dlg.addEventListener('cancel', (e) => { e.preventDefault(); close(); });
  document.body.append(dlg);
  dlg.showModal();
  draw();
  input.focus();
}

document.addEventListener('keydown', (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === 'k') { e.preventDefault(); openPalette(); }
});

// ---- session upkeep ----
for (const ev of ['click', 'keydown']) document.addEventListener(ev, () => session.touch(), { passive: true });
setInterval(() => {
  const reason = session.expiredReason();
  if (reason) { logout(); renderLogin(reason); }
}, 5000);
window.addEventListener('cycles:unauthorized', () => { logout(); renderLogin('The key is no longer accepted; sign in again.'); });
window.addEventListener('hashchange', renderRoute);
window.addEventListener('error', (e) => toast(`Unexpected error: ${e.message}`, 'error'));
// an action refused by the server (409, 403 …) outside a form: say so instead of failing silently
window.addEventListener('unhandledrejection', (e) => {
  toast(e.reason && e.reason.message ? e.reason.message : String(e.reason), 'error');
  e.preventDefault();
});
renderRoute();
