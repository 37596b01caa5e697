// eth-twisted dashboard: polls the stats API and draws everything with DOM APIs.
// Payloads come from untrusted peers: they only ever reach the page as
// text nodes (never parsed as markup), and the server's CSP forbids inline script.
"use strict";

(function () {
  const STATS_EVERY_MS = 1000;
  const READY_EVERY_MS = 5000;
  const MESSAGES_SHOWN = 8;
  const CHAINS_SHOWN = 20;
  const REORGS_SHOWN = 5;
  const TOKEN_KEY = "eth-twisted-token";

  const state = {
    token: null,
    stats: null,
    statsAt: 0,           // performance.now() when stats arrived
    lastRecords: -1,
    lastHead: null,
    failures: 0,
    needAuth: false,
  };

  const $ = (id) => document.getElementById(id);

  // el("td", {class: "num"}, "text", childNode...): children are text or nodes, never markup.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") node.className = v;
      else node.setAttribute(k, String(v));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(id, text) {
    const node = $(id);
    if (node && node.textContent !== text) node.textContent = text;
  }

  const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

  function fmtAge(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function fmtTime(unix) {
    if (unix === null || unix === undefined) return "–";
    const d = new Date(unix * 1000);
    return d.toLocaleString("en-GB", { hour12: false });
  }

  function fmtClock(unix) {
    const d = new Date(unix * 1000);
    return d.toLocaleTimeString("en-GB", { hour12: false });
  }

  // -- token --------------------------------------------------------------------------

  function loadToken() {
    const hash = window.location.hash.replace(/^#/, "");
    const params = new URLSearchParams(hash);
    if (params.get("token")) {
      state.token = params.get("token");
      try { sessionStorage.setItem(TOKEN_KEY, state.token); } catch (e) { /* private mode */ }
      history.replaceState(null, "", window.location.pathname + window.location.search);
      return;
    }
    try { state.token = sessionStorage.getItem(TOKEN_KEY); } catch (e) { state.token = null; }
  }

  function showAuth(show) {
    state.needAuth = show;
    $("auth").hidden = !show;
    $("main").hidden = show;
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    const resp = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    if (resp.status === 401) {
      showAuth(true);
      throw new Error("unauthorized");
    }
    const body = await resp.json();
    return { status: resp.status, body };
  }

  // -- status pill --------------------------------------------------------------------

  function setStatus(kind, text) {
    const pill = $("status");
    pill.className = "pill pill-" + kind;
    pill.dataset.state = kind;
    setText("status-text", text);
  }

  // -- rendering ------------------------------------------------------------------------

  function renderStats(s) {
    const head = s.latest_block ? s.latest_block.number : null;
    const headNode = $("head-number");
    const headText = head === null ? "–" : fmtInt(head);
    if (headNode.dataset.value !== String(head ?? "")) {
      headNode.dataset.value = head === null ? "" : String(head);
      headNode.textContent = headText;
      if (state.lastHead !== null && head !== null) {
        headNode.classList.remove("flash");
        void headNode.offsetWidth; // restart the animation
        headNode.classList.add("flash");
      }
      state.lastHead = head;
    }
    const t = s.totals;
    setText("records", fmtInt(t.records));
    setText("messages", fmtInt(t.messages));
    setText("duplicates", fmtInt(t.duplicates));
    setText("clients-count", fmtInt(t.clients));
    setText("dup-rate", t.messages ? ((100 * t.duplicates) / t.messages).toFixed(1) + "% of messages" : "no messages yet");
    setText("uptime", fmtAge(s.uptime_seconds));
    setText("first-at", fmtTime(s.first_received_at));
    setText("last-at", fmtTime(s.last_received_at));
    setText("source", s.messages_source === "redis" ? "Redis" : "SQL (since start)");
    renderClients(s.clients, s.now, t.clients, s.clients_omitted || 0);
    renderChart(s.chart, s.now);
    tickAge();
  }

  function tickAge() {
    const s = state.stats;
    const node = $("head-age");
    if (!s || !s.latest_block || s.latest_block.age_seconds === null) {
      node.textContent = "no block yet";
      node.className = "age";
      return;
    }
    const age = s.latest_block.age_seconds + (performance.now() - state.statsAt) / 1000;
    node.textContent = "received " + fmtAge(age) + " ago";
    node.className = "age " + (age < 30 ? "fresh" : age < 120 ? "stale" : "old");
  }

  // The API lists the busiest client groups (an address, or an IPv6 /64) and counts the rest.
  function renderClients(clients, now, total, omitted) {
    const body = $("client-rows");
    const rows = clients.map((c) =>
      el("tr", {},
        el("td", { class: "addr" }, c.ip),
        el("td", { class: "num" }, fmtInt(c.records)),
        el("td", { class: "num" }, fmtInt(c.messages)),
        el("td", { class: "num" }, c.latest_block === null ? "–" : fmtInt(c.latest_block)),
        el("td", { class: "num" }, c.last_seen === null ? "before start" : fmtAge(now - c.last_seen) + " ago")));
    if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 5 }, "no clients yet")));
    body.replaceChildren(...rows);
    const count = total === 1 ? "1 address" : fmtInt(total) + " addresses";
    setText("clients-meta", omitted ? count + " · busiest " + clients.length + " shown" : count);
  }

  function renderSinks(status, body) {
    const list = $("sinks");
    const sinks = (body && body.sinks) || {};
    const items = Object.entries(sinks).map(([name, info]) =>
      el("li", {},
        el("span", { class: "name" }, name),
        info.ok
          ? el("span", { class: "ok" }, "● up · " + info.latency_ms.toFixed(1) + " ms")
          : el("span", { class: "bad" }, "● down · " + (info.error || "no answer"))));
    if (!items.length) items.push(el("li", { class: "empty" }, "no sinks reported"));
    list.replaceChildren(...items);
    setText("sinks-meta", status === 200 ? "all answering" : "degraded");
  }

  function payloadKind(m) {
    if (m.payload_encoding !== "utf-8") return "binary";
    const head = m.payload.slice(0, 64).trimStart().toLowerCase();
    if (head.startsWith("<!doctype html") || head.startsWith("<html")) return "html";
    if (head.startsWith("{") || head.startsWith("[")) return "json";
    return "text";
  }

  function renderMessages(page) {
    const list = $("messages-list");
    const items = page.messages.map((m) => {
      const text = m.payload_encoding === "utf-8" ? m.payload : "(base64) " + m.payload;
      const oneLine = text.replace(/\s+/g, " ").trim();
      return el("li", { class: "msg" },
        el("details", {},
          el("summary", {},
            el("span", { class: "blk" }, m.block_number === null ? "no block" : "#" + fmtInt(m.block_number)),
            el("span", { class: "kind kind-" + payloadKind(m) }, payloadKind(m)),
            el("span", { class: "preview" }, oneLine.slice(0, 160)),
            el("span", { class: "who" }, m.client_ip),
            el("span", { class: "when" }, fmtClock(m.received_at))),
          el("pre", { class: "payload" }, text),
          el("span", { class: "hash" }, "sha256 " + m.hash + " · " + fmtInt(m.size) + " bytes")));
    });
    if (!items.length) items.push(el("li", { class: "empty" }, "nothing stored yet"));
    list.replaceChildren(...items);
  }

  const shortHash = (h) => (h ? h.slice(0, 10) + "…" + h.slice(-4) : "–");
  const point = (p) => (p ? "#" + fmtInt(p.number) : "–");

  // Chains: head, safe, finalized and reorg counts; a violation is flagged, never hidden.
  function renderChains(chains, reorgs) {
    const rows = chains.map((c) =>
      el("tr", { class: c.violations ? "violation" : null, "data-chain": c.chain_id },
        el("td", { class: "num" }, String(c.chain_id)),
        el("td", { class: "num head" }, point(c.head), " ", el("span", { class: "hash" }, shortHash(c.head && c.head.hash))),
        el("td", { class: "num" }, point(c.safe)),
        el("td", { class: "num finalized" }, point(c.finalized)),
        el("td", { class: "num" }, fmtInt(c.reorgs)),
        el("td", { class: "num violations" }, c.violations ? "⚠ " + fmtInt(c.violations) : "0")));
    if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 6 }, "no chain records yet")));
    $("chain-rows").replaceChildren(...rows);
    const items = reorgs.map((r) =>
      el("li", { class: "reorg" + (r.below_finality ? " violation" : "") },
        el("span", { class: "chain" }, "chain " + r.chain_id),
        el("span", { class: "fork" }, "after #" + fmtInt(r.fork_number)),
        el("span", { class: "depth" }, "depth " + fmtInt(r.depth) + ", " + fmtInt(r.replaced) + " new"),
        el("span", { class: "hash" }, shortHash(r.old_head) + " → " + shortHash(r.new_head)),
        r.below_finality
          ? el("span", { class: "flag" }, "below finality (finalized #" + fmtInt(r.finalized_number) + ")")
          : null,
        el("span", { class: "when" }, fmtClock(r.received_at))));
    if (!items.length) items.push(el("li", { class: "empty" }, "no reorg yet"));
    $("reorgs-list").replaceChildren(...items);
    setText("chains-meta", chains.length ? chains.length + (chains.length === 1 ? " chain" : " chains") : "json records only");
  }

  async function pollChains() {
    if (state.needAuth) return;
    try {
      const { status, body } = await api("/api/chains?limit=" + CHAINS_SHOWN);
      if (status !== 200) return;
      const withReorgs = body.chains.filter((c) => c.reorgs > 0);
      const pages = await Promise.all(withReorgs.map((c) =>
        api("/api/chains/" + encodeURIComponent(c.chain_id) + "/reorgs?limit=" + REORGS_SHOWN)));
      const reorgs = pages.filter((p) => p.status === 200).flatMap((p) => p.body.reorgs);
      reorgs.sort((a, b) => b.received_at - a.received_at);
      renderChains(body.chains, reorgs.slice(0, REORGS_SHOWN));
    } catch (e) { /* the status pill already says so */ }
  }

  // -- chart ----------------------------------------------------------------------------

  function niceStep(range, ticks) {
    const raw = range / Math.max(1, ticks);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / mag;
    const step = norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10;
    return Math.max(1, step * mag);
  }

  function renderChart(points, now) {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const css = getComputedStyle(document.documentElement);
    const muted = css.getPropertyValue("--muted").trim() || "#8f98bd";
    const accent = css.getPropertyValue("--accent").trim() || "#8ea2ff";
    const accent2 = css.getPropertyValue("--accent2").trim() || "#5ee0c2";
    ctx.font = "12px system-ui, sans-serif";

    if (!points.length) {
      ctx.fillStyle = muted;
      ctx.textAlign = "center";
      ctx.fillText("waiting for the first block…", width / 2, height / 2);
      setText("chart-meta", "no blocks yet");
      return;
    }

    let yMin = Infinity, yMax = -Infinity;
    for (const [, n] of points) { yMin = Math.min(yMin, n); yMax = Math.max(yMax, n); }
    const xMax = Math.max(now, points[points.length - 1][0]);
    const xMin = Math.min(points[0][0], xMax - 60);
    if (yMax - yMin < 4) { yMin -= 2; yMax += 2; }
    const step = niceStep(yMax - yMin, 4);
    yMin = Math.floor(yMin / step) * step;
    yMax = Math.ceil(yMax / step) * step;
    const yLabelWidth = Math.max(...[yMin, yMax].map((v) => ctx.measureText(fmtInt(v)).width)) + 16;
    const pad = { left: yLabelWidth, right: 18, top: 14, bottom: 28 };
    const w = width - pad.left - pad.right;
    const h = height - pad.top - pad.bottom;
    const X = (t) => pad.left + ((t - xMin) / Math.max(1e-9, xMax - xMin)) * w;
    const Y = (n) => pad.top + h - ((n - yMin) / Math.max(1e-9, yMax - yMin)) * h;

    // grid and y labels
    ctx.strokeStyle = "rgba(255,255,255,0.07)";
    ctx.lineWidth = 1;
    ctx.fillStyle = muted;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let v = yMin; v <= yMax + step / 2; v += step) {
      const y = Math.round(Y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(pad.left, y); ctx.lineTo(width - pad.right, y); ctx.stroke();
      ctx.fillText(fmtInt(v), pad.left - 8, y);
    }
    // x labels
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const xTicks = Math.max(2, Math.min(6, Math.floor(w / 140)));
    for (let i = 0; i <= xTicks; i++) {
      const t = xMin + ((xMax - xMin) * i) / xTicks;
      ctx.fillText(fmtClock(t), Math.min(Math.max(X(t), pad.left + 26), width - pad.right - 26), height - pad.bottom + 8);
    }

    // area under the line
    const grad = ctx.createLinearGradient(0, pad.top, 0, pad.top + h);
    grad.addColorStop(0, "rgba(142,162,255,0.35)");
    grad.addColorStop(1, "rgba(142,162,255,0)");
    ctx.beginPath();
    ctx.moveTo(X(points[0][0]), Y(points[0][1]));
    for (const [t, n] of points) ctx.lineTo(X(t), Y(n));
    ctx.lineTo(X(xMax), Y(points[points.length - 1][1]));
    ctx.lineTo(X(xMax), pad.top + h);
    ctx.lineTo(X(points[0][0]), pad.top + h);
    ctx.closePath();
    ctx.fillStyle = grad;
    ctx.fill();

    // the line itself, then a dot per block
    const line = ctx.createLinearGradient(pad.left, 0, pad.left + w, 0);
    line.addColorStop(0, accent);
    line.addColorStop(1, accent2);
    ctx.beginPath();
    ctx.moveTo(X(points[0][0]), Y(points[0][1]));
    for (const [t, n] of points) ctx.lineTo(X(t), Y(n));
    ctx.strokeStyle = line;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.stroke();
    if (points.length <= 120) {
      for (const [t, n] of points) {
        ctx.beginPath(); ctx.arc(X(t), Y(n), 2.6, 0, Math.PI * 2);
        ctx.fillStyle = accent2; ctx.fill();
      }
    }
    const [lt, ln] = points[points.length - 1];
    ctx.beginPath(); ctx.arc(X(lt), Y(ln), 5, 0, Math.PI * 2);
    ctx.fillStyle = "#ffffff"; ctx.fill();
    ctx.lineWidth = 2; ctx.strokeStyle = accent2; ctx.stroke();

    const span = points[points.length - 1][0] - points[0][0];
    const rate = span > 0 ? ((points.length - 1) / span) * 60 : 0;
    setText("chart-meta", points.length + " blocks · " + fmtAge(span) + " · " + rate.toFixed(1) + " blocks/min");
  }

  // -- polling --------------------------------------------------------------------------

  async function pollStats() {
    if (state.needAuth) return;
    try {
      const { status, body } = await api("/api/stats");
      if (status !== 200) throw new Error("status " + status);
      state.stats = body;
      state.statsAt = performance.now();
      state.failures = 0;
      setStatus("live", "live");
      renderStats(body);
      if (body.totals.records !== state.lastRecords) {
        state.lastRecords = body.totals.records;
        pollMessages();
        pollChains();
      }
    } catch (e) {
      state.failures += 1;
      if (!state.needAuth) setStatus(state.failures > 2 ? "down" : "wait", state.failures > 2 ? "server not answering" : "retrying");
    }
  }

  async function pollMessages() {
    try {
      const { status, body } = await api("/api/messages?limit=" + MESSAGES_SHOWN);
      if (status === 200) renderMessages(body);
    } catch (e) { /* the status pill already says so */ }
  }

  async function pollReady() {
    try {
      const resp = await fetch("/readyz", { cache: "no-store", credentials: "omit" });
      renderSinks(resp.status, await resp.json());
    } catch (e) {
      renderSinks(0, null);
    }
  }

  function start() {
    loadToken();
    $("auth-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.token = $("auth-token").value.trim();
      try { sessionStorage.setItem(TOKEN_KEY, state.token); } catch (e) { /* private mode */ }
      showAuth(false);
      pollStats();
    });
    window.addEventListener("resize", () => state.stats && renderChart(state.stats.chart, state.stats.now));
    pollStats();
    pollReady();
    setInterval(pollStats, STATS_EVERY_MS);
    setInterval(pollReady, READY_EVERY_MS);
    setInterval(tickAge, 250);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
