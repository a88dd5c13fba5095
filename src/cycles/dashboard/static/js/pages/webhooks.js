import { get, getAll, post, patch, del, session } from '../api.js';
import { h, clear, fmt, badge, formDialog, confirmDialog, toast, simpleTable, errorBox, table } from '../ui.js';
import { listPage, markTruncated } from './common.js';
import { donut, hbars } from '../chart.js';
import { showSecret } from './lists.js';
import { go } from '../main.js';

const base = () => (session.isAdmin ? '/v1/admin/webhooks' : '/v1/webhooks');

export function createWebhookDialog(tenantId) {
  const fields = [];
  if (session.isAdmin) fields.push({ name: 'tenant_id', label: 'Tenant (empty: every tenant, a system subscription)', value: tenantId || '' });
  fields.push({ name: 'url', label: 'URL (https://…)', type: 'url', required: true },
    { name: 'name', label: 'Name (optional)' },
    { name: 'event_types', label: 'Event types (comma-separated)', value: 'budget.exhausted,budget.threshold_crossed,reservation.denied', required: true });
  return formDialog('Create webhook', fields, 'Create webhook', async (v) => {
    const body = { url: v.url.trim(), event_types: v.event_types.split(',').map((s) => s.trim()).filter(Boolean) };
    if (v.name) body.name = v.name;
    const q = session.isAdmin && v.tenant_id ? { tenant_id: v.tenant_id.trim() } : undefined;
    const created = await post(base(), body, q);
    if (created.signing_secret) await showSecret('Webhook created', created.signing_secret, 'Signing secret of the subscription: verify X-Cycles-Signature with it. It is shown only now.');
    toast(`Created webhook ${created.subscription.subscription_id}`, 'ok');
    return created;
  }, { wide: true });
}

export async function setPaused(w, pause) {
  await patch(`${base()}/${encodeURIComponent(w.subscription_id)}`, { status: pause ? 'PAUSED' : 'ACTIVE' });
  toast(`${pause ? 'Paused' : 'Resumed'} ${w.subscription_id}`, 'ok');
  return true;
}

export async function testWebhook(w) {
  const r = await post(`${base()}/${encodeURIComponent(w.subscription_id)}/test`);
  toast(r.success ? `Test delivered: HTTP ${r.response_status} in ${r.response_time_ms} ms` : `Test failed: ${r.error_message || `HTTP ${r.response_status}`}`, r.success ? 'ok' : 'error');
  return r;
}

export async function deleteWebhook(w) {
  const ok = await confirmDialog(`Delete webhook ${w.subscription_id}`, `${w.url} will receive nothing more. This cannot be undone.`, 'Delete webhook', { danger: true });
  if (!ok) return false;
  await del(`${base()}/${encodeURIComponent(w.subscription_id)}`);
  toast(`Deleted ${w.subscription_id}`, 'ok');
  return true;
}

function actionsFor(w, refresh) {
  if (!session.can('manage_webhooks')) return '';
  const run = (fn) => () => fn().then((ok) => ok && refresh()).catch((e) => toast(e.message, 'error'));
  return h('span', { class: 'row-actions' },
    w.status === 'ACTIVE' ? h('button', { type: 'button', class: 'small', 'aria-label': `Pause ${w.subscription_id}`, onclick: run(() => setPaused(w, true)) }, 'Pause')
      : h('button', { type: 'button', class: 'small', 'aria-label': `Resume ${w.subscription_id}`, onclick: run(() => setPaused(w, false)) }, 'Resume'),
    h('button', { type: 'button', class: 'small', 'aria-label': `Test ${w.subscription_id}`, onclick: () => testWebhook(w).then(refresh).catch((e) => toast(e.message, 'error')) }, 'Test'),
    // deleted from its own page: back to the list (reloading the page would ask for a webhook that is gone)
    h('button', { type: 'button', class: 'small danger', 'aria-label': `Delete ${w.subscription_id}`, onclick: () => deleteWebhook(w)
      .then((ok) => { if (ok && location.hash.startsWith('#/webhook/')) go('webhooks'); else if (ok) refresh(); })
      .catch((e) => toast(e.message, 'error')) }, 'Delete'));
}

export function render(main, r) {
  let page;
  const actions = session.can('manage_webhooks') ? [h('button', { type: 'button', class: 'primary', id: 'create-webhook',
    onclick: () => createWebhookDialog(page.values.tenant_id).then((x) => x && page.refresh()) }, 'Create webhook')] : [];
  const filters = [];
  if (session.isAdmin) filters.push({ name: 'tenant_id', label: 'Tenant', type: 'text', placeholder: 'all' });
  filters.push({ name: 'status', label: 'Status', type: 'select', options: [['', 'any'], 'ACTIVE', 'PAUSED', 'DISABLED'] },
    { name: 'failing', label: 'Failing only', type: 'checkbox' });
  page = listPage(main, r, { title: 'Webhooks', name: 'webhooks', actions, filters, liveTypes: ['webhook.'],
    columns: [
      { label: 'Subscription', value: (w) => w.subscription_id, render: (w) => h('a', { href: `#/webhook/${encodeURIComponent(w.subscription_id)}` }, w.subscription_id), class: 'mono' },
      { label: 'URL', value: (w) => w.url, width: 'minmax(200px, 2fr)' },
      { label: 'Tenant', value: (w) => w.tenant_id },
      { label: 'Status', value: (w) => w.status, render: (w) => badge(w.status), width: '110px' },
      { label: 'Failures', value: (w) => w.consecutive_failures, render: (w) => (w.consecutive_failures ? h('span', { class: 'crit-text' }, String(w.consecutive_failures)) : '0'), class: 'num', width: '90px' },
      { label: 'Events', value: (w) => (w.event_types || []).join(' '), render: (w) => `${(w.event_types || []).length} types` },
      { label: 'Actions', value: () => '', export: () => '', width: 'minmax(220px, 1.4fr)', render: (w) => actionsFor(w, () => page.refresh()) },
    ],
    key: (w) => w.subscription_id, onRow: (w) => go('webhook', null, w.subscription_id),
    load: async (v, onPage) => {
      const q = session.isAdmin ? { tenant_id: v.tenant_id || undefined, status: v.status || undefined } : { status: v.status || undefined };
      const { rows, more } = await getAll(base(), q, 'subscriptions', { onPage });
      return markTruncated(v.failing ? rows.filter((w) => w.consecutive_failures > 0) : rows, more);
    } });
  return page.cleanup;
}

function quantile(sorted, q) { return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] : null; }

export async function renderDetail(main, r) {
  let w;
  let deliveries;
  try {
    w = await get(`${base()}/${encodeURIComponent(r.id)}`);
    deliveries = (await getAll(`${base()}/${encodeURIComponent(r.id)}/deliveries`, {}, 'deliveries', { max: 1000 })).rows;
  } catch (e) { clear(main, errorBox(e)); return; }
  const reload = () => renderDetail(main, r);
  const byStatus = {};
  for (const d of deliveries) byStatus[d.status] = (byStatus[d.status] || 0) + 1;
  const times = deliveries.map((d) => d.response_time_ms).filter((x) => x !== null && x !== undefined).sort((a, b) => a - b);
  const attempts = {};
  for (const d of deliveries) { const k = String(d.attempts || 1); attempts[k] = (attempts[k] || 0) + 1; }
  const lastOk = deliveries.find((d) => d.status === 'SUCCESS');
  const replay = () => formDialog('Replay events', [
    { name: 'hours', label: 'Hours back', type: 'number', min: 1, step: 1, value: 1 },
    { name: 'max_events', label: 'At most (1–1000)', type: 'number', min: 1, step: 1, value: 100 },
  ], 'Replay', async (v) => {
    const to = new Date();
    const body = { from: new Date(to - Number(v.hours) * 3600000).toISOString(), to: to.toISOString(), max_events: Number(v.max_events) };
    const res = await post(`/v1/admin/webhooks/${encodeURIComponent(w.subscription_id)}/replay`, body);
    toast(`Replay queued ${res.events_queued} event(s)`, 'ok');
    return res;
  });
  clear(main,
    h('p', {}, h('a', { href: '#/webhooks' }, '← Webhooks')),
    h('div', { class: 'page-head' }, h('h1', {}, `Webhook ${w.name || w.subscription_id} `, badge(w.status)),
      h('div', { class: 'page-actions' }, actionsFor(w, reload), session.isAdmin && session.can('manage_webhooks') ? h('button', { type: 'button', onclick: () => replay() }, 'Replay…') : null)),
    h('dl', { class: 'facts' }, h('dt', {}, 'URL'), h('dd', {}, w.url), h('dt', {}, 'Tenant'), h('dd', {}, w.tenant_id),
      h('dt', {}, 'Last success'), h('dd', {}, lastOk ? `${fmt.time(lastOk.attempted_at)} (${fmt.ago(lastOk.attempted_at)})` : 'never'),
      h('dt', {}, 'Consecutive failures'), h('dd', {}, String(w.consecutive_failures)),
      h('dt', {}, 'Response time p50 / p95 / max'), h('dd', { id: 'latency' }, times.length ? `${quantile(times, 0.5)} / ${quantile(times, 0.95)} / ${times[times.length - 1]} ms` : '—'),
      h('dt', {}, 'Event types'), h('dd', {}, (w.event_types || []).join(', '))),
    h('div', { class: 'cards' },
      h('section', { class: 'card' }, h('h2', {}, 'Delivery outcomes'), donut(Object.entries(byStatus).map(([k, v]) => ({ label: k, value: v })), { label: 'delivery outcomes' })),
      h('section', { class: 'card' }, h('h2', {}, 'Attempts per delivery'), hbars(Object.entries(attempts).sort().map(([k, v]) => ({ key: `${k} attempt(s)`, value: v })), { label: 'attempts histogram' }))),
    h('h2', {}, 'Recent deliveries'),
    simpleTable(['Time', 'Event', 'Status', 'HTTP', 'Time (ms)', 'Attempts', 'Error'], deliveries.slice(0, 50).map((d) =>
      [fmt.time(d.attempted_at), d.event_type || d.event_id, badge(d.status), String(d.response_status ?? '—'), String(d.response_time_ms ?? '—'), String(d.attempts ?? 1), d.error_message || ''])));
}

export function commands() { return [{ label: 'Create webhook', run: () => createWebhookDialog() }, { label: 'Webhooks: failing', run: () => go('webhooks', { failing: '1' }) }]; }
