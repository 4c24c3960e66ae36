// kvserve /dashboard: renders the snapshots /dashboard/events pushes (see kvserve/server/dashboard.py).
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let key = params.get("key") || sessionStorage.getItem("kvserve-key") || "";
let source = null;
let lastTokens = null;  // (time, generation_tokens) of the previous snapshot, for tokens per second

function query() { return key ? "?key=" + encodeURIComponent(key) : ""; }

// one stable colour per request id
function colour(id) {
  let h = 0;
  for (const c of id) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${Math.round((h % 1000) * 137.508) % 360} 65% 50%)`;  // golden-angle hues: neighbours differ
}

async function start() {
  const r = await fetch("/dashboard/state" + query());
  if (r.status === 401) {
    $("main").hidden = true;
    $("key-form").hidden = false;
    $("status").textContent = "API key required";
    if (key) $("key-error").textContent = "that key was refused";
    return;
  }
  if (!r.ok) { $("status").textContent = `error ${r.status}`; return; }
  if (key) sessionStorage.setItem("kvserve-key", key);
  $("key-form").hidden = true;
  $("main").hidden = false;
  render(await r.json());
  source = new EventSource("/dashboard/events" + query());
  source.onmessage = (e) => render(JSON.parse(e.data));
  source.onopen = () => { $("status").textContent = "live"; $("status").className = "status live"; };
  source.onerror = () => { $("status").textContent = "connection lost, retrying…"; $("status").className = "status lost"; };
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  key = $("key-input").value.trim();
  start();
});

function render(s) {
  document.body.dataset.step = s.step;
  renderCounters(s);
  renderGrid(s);
  renderRequests(s);
  renderTree(s.tree);
}

const mib = (bytes) => (bytes / 2 ** 20).toFixed(1);

function renderCounters(s) {
  const c = s.counters;
  let tps = "–";
  if (lastTokens && s.time > lastTokens[0]) tps = ((c.generation_tokens - lastTokens[1]) / (s.time - lastTokens[0])).toFixed(1);
  lastTokens = [s.time, c.generation_tokens];
  const items = [
    ["blocks in use", c.blocks_used, "used"], ["cached", c.blocks_cached, "cached"], ["free", c.blocks_free, "free"],
    ["prefix hit rate", (100 * c.prefix_cache_hit_rate).toFixed(1) + " %", "hit-rate"],
    ["preemptions", c.preemptions, "preemptions"], ["evicted blocks", c.prefix_cache_evicted_blocks, "evicted"],
    ["running / waiting / swapped", `${c.requests_running} / ${c.requests_waiting} / ${c.requests_swapped}`, "queues"],
    ["tokens / s", tps, "tps"], ["step", c.steps, "step"],
    // the pool is reserved untouched, then touched in idle time (or by use): the part that holds RAM
    ["KV pool touched", `${mib(c.kv_bytes_touched)} / ${mib(c.kv_bytes_allocated)} MiB`, "touched"],
  ];
  $("counters").replaceChildren(...items.map(([label, value, id]) => {
    const d = document.createElement("div");
    d.className = "counter";
    d.id = "counter-" + id;
    d.innerHTML = `<b></b><span></span>`;
    d.querySelector("b").textContent = value;
    d.querySelector("span").textContent = label;
    return d;
  }));
}

function renderGrid(s) {
  const grid = $("grid");
  while (grid.children.length < s.blocks.length) {
    const d = document.createElement("div");
    grid.appendChild(d);
  }
  while (grid.children.length > s.blocks.length) grid.lastChild.remove();
  s.blocks.forEach((owner, i) => {
    const d = grid.children[i];
    const kind = owner === "free" || owner === "cached" || owner === "shared" ? owner : "req";
    d.className = "cell " + kind;
    d.dataset.owner = owner;
    d.style.background = kind === "req" ? colour(owner) : "";
    d.title = `block ${i + 1}: ${owner}`;
  });
  const swap = [];
  for (const [id, n] of s.swapped) for (let i = 0; i < n; i++) {
    const d = document.createElement("div");
    d.className = "cell swapped";
    d.dataset.owner = id;
    d.style.background = colour(id);
    d.title = `swapped out: ${id}`;
    swap.push(d);
  }
  $("swap").replaceChildren(...swap);
  $("swap-row").hidden = swap.length === 0;
  $("pool-caption").textContent =
    `${s.blocks.length} blocks x ${s.block_size} tokens, ${(s.block_bytes / 1024).toFixed(0)} KiB each (${s.kv_cache_dtype})`;
}

function renderRequests(s) {
  const body = $("requests").querySelector("tbody");
  body.replaceChildren(...s.requests.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    const blocks = r.block_tables.map((t) => "[" + t.join(" ") + "]").join(" ");
    const cells = ["", r.id, r.status, r.prompt_tokens, r.output_tokens, r.computed_tokens, r.preemptions, blocks];
    cells.forEach((v, i) => {
      const td = document.createElement("td");
      if (i === 0) { td.innerHTML = '<span class="swatch"></span>'; td.firstChild.style.background = colour(r.id); }
      else if (i === 1) { td.textContent = v.length > 14 ? "…" + v.slice(-10) : v; td.title = v; }
      else td.textContent = v;
      if (i === 7) td.className = "blocks";
      tr.appendChild(td);
    });
    return tr;
  }));
  $("no-requests").hidden = s.requests.length > 0;
}

function renderTree(root) {
  const el = $("tree");
  if (!root) { el.textContent = "prefix caching is off"; $("tree-caption").textContent = ""; return; }
  $("tree-caption").textContent = `${root.cached_blocks} blocks cached, ${root.evictable_blocks} evictable`;
  const open = new Set([...el.querySelectorAll("details[open]")].map((d) => d.dataset.path));
  const build = (node, path) => {
    const d = document.createElement("details");
    d.dataset.path = path;
    d.className = "node";
    if (open.has(path) || path.split("/").length <= 2) d.open = true;
    const sum = document.createElement("summary");
    const pre = document.createElement("span");
    pre.className = "preview";
    pre.textContent = JSON.stringify(node.preview);
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = ` ${node.tokens} tokens / ${node.blocks} blocks · lock ${node.lock} · last access ${node.last_access}`;
    sum.append(pre, meta);
    d.appendChild(sum);
    node.children.forEach((c, i) => d.appendChild(build(c, path + "/" + i)));
    if (node.truncated) { const m = document.createElement("div"); m.className = "meta"; m.textContent = "… (cut)"; d.appendChild(m); }
    return d;
  };
  el.replaceChildren(...root.children.map((c, i) => build(c, "/" + i)));
  if (!root.children.length) el.textContent = "empty";
}

start();
