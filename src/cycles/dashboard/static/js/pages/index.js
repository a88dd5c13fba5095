import * as overview from './overview.js';
import * as tenants from './tenants.js';
import * as budgets from './budgets.js';
import * as lists from './lists.js';
import * as webhooks from './webhooks.js';
import * as spend from './spend.js';
import * as governance from './governance.js';
import * as evidence from './evidence.js';

// cap: the /v1/auth/introspect capability that shows the page; show(): a finer test where no single flag fits
export const PAGES = [
  { name: 'overview', title: 'Overview', cap: 'view_overview', render: overview.render },
  { name: 'spend', title: 'Spend', cap: 'view_reservations', render: spend.render },
  { name: 'tenants', title: 'Tenants', cap: 'view_tenants', render: tenants.render, commands: tenants.commands },
  { name: 'tenant', title: 'Tenant', cap: 'view_tenants', render: tenants.renderDetail, hidden: true, parent: 'tenants' },
  { name: 'budgets', title: 'Budgets', cap: 'view_budgets', render: budgets.render, commands: budgets.commands },
  { name: 'hierarchy', title: 'Hierarchy', cap: 'view_budgets', render: budgets.renderTree },
  { name: 'reservations', title: 'Reservations', cap: 'view_reservations', render: lists.reservations },
  { name: 'events', title: 'Events', cap: 'view_events', render: lists.events },
  { name: 'denials', title: 'Denials', cap: 'view_events', render: spend.renderDenials },
  { name: 'governance', title: 'Governance', show: governance.canViewGovernance, render: governance.render },
  { name: 'evidence', title: 'Evidence', render: evidence.render },
  { name: 'keys', title: 'API keys', cap: 'view_api_keys', render: lists.keys, commands: lists.keyCommands },
  { name: 'webhooks', title: 'Webhooks', cap: 'view_webhooks', render: webhooks.render, commands: webhooks.commands },
  { name: 'webhook', title: 'Webhook', cap: 'view_webhooks', render: webhooks.renderDetail, hidden: true, parent: 'webhooks' },
  { name: 'audit', title: 'Audit', cap: 'view_audit', render: lists.audit },
];
