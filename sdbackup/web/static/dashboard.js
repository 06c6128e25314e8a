// Polls /api/status and redraws the page. Texts go in with textContent; the only markup
// inserted is the SVG the manager drew (it escapes what it draws).
"use strict";

const POLL_MS = 2000;

function humanBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n.toFixed(0)} B` : `${n.toFixed(1)} ${units[i]}`;
}

function humanAge(s) {
  if (s < 90) return `${s.toFixed(0)} s`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function setNumber(id, value) {
  document.querySelector(`#${id} b`).textContent = value === null ? "?" : String(value);
}

function draw(s) {
  document.getElementById("state").textContent = s.state;
  document.getElementById("replicas").textContent = s.replicas;
  document.getElementById("updated").textContent = new Date(s.time * 1000).toLocaleTimeString();
  document.getElementById("servers-alive").textContent = s.servers_alive;

  const body = document.querySelector("#servers tbody");
  body.replaceChildren();
  for (const server of s.servers) {
    const row = body.insertRow();
    row.className = `server server-${server.state}`;
    row.dataset.address = server.address;
    cell(row, server.address, "address");
    cell(row, server.state, `state state-${server.state}`);
    cell(row, String(server.chunks), "chunks");
    cell(row, server.used_bytes === null
      ? `${humanBytes(server.cluster_bytes)} / ? / ${humanBytes(server.free_bytes)}`
      : `${humanBytes(server.cluster_bytes)} / ${humanBytes(server.used_bytes)} / ` +
        `${humanBytes(server.free_bytes)}`, "space");
    cell(row, "").innerHTML = server.bar;
    const scrub = cell(row, "", "scrub");
    if (server.scrub) {
      scrub.textContent = `scrub ${server.scrub.done.toLocaleString("en")} / ` +
        `${server.scrub.total.toLocaleString("en")} chunks`;
      scrub.insertAdjacentHTML("beforeend", `<br>${server.scrub.bar}`);
    }
    cell(row, `${humanAge(server.heartbeat_age)} ago`, "heartbeat");
  }

  const h = s.health || {};
  setNumber("health-chunks", h.chunks ?? null);
  setNumber("health-healthy", h.healthy ?? null);
  setNumber("health-under", h.under_replicated ?? null);
  setNumber("health-missing", h.missing ?? null);
  const r = s.repair;
  document.getElementById("repair").textContent = r.running
    ? `repair under way: ${r.chunks_left ?? "?"} chunks short, ${humanBytes(r.copied_bytes)} ` +
      `copied, ${humanBytes(r.bytes_per_second)}/s`
    : (r.copied_bytes ? `repair: ${humanBytes(r.copied_bytes)} copied since the manager started` : "");
  document.getElementById("chart-health").innerHTML = s.charts.health;

  document.getElementById("snapshot-count").textContent = s.snapshots.count;
  document.getElementById("chart-snapshots").innerHTML = s.charts.snapshots;
  document.getElementById("throughput").textContent =
    `${humanBytes(s.throughput.bytes_per_second)}/s`;
  document.getElementById("chart-throughput").innerHTML = s.charts.throughput;

  const events = document.getElementById("events");
  events.replaceChildren();
  for (const e of s.events) {
    const li = document.createElement("li");
    li.className = `event kind-${e.kind}`;
    li.textContent = `${new Date(e.time * 1000).toLocaleTimeString()} ${e.text}`;
    events.appendChild(li);
  }
  document.body.dataset.loaded = "true";
}

async function poll() {
  try {
    const reply = await fetch("api/status", { cache: "no-store" });
    if (!reply.ok) throw new Error(`status ${reply.status}`);
    draw(await reply.json());
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = `(cannot reach the manager: ${e.message})`;
  }
  setTimeout(poll, POLL_MS);
}

poll();
