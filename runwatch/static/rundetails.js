// RunDetails front end (anywidget). Draws the synced `state`; uPlot (prepended to this module) draws charts.
// Nothing here fetches from the network: images arrive as data URIs in the state.

const TERMINAL = new Set(["Completed", "Failed", "Canceled"]);

function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return e;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Math.abs(v) >= 1e5 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : String(+v.toFixed(4));
  return String(v);
}

function duration(s) {
  if (s === null || s === undefined) return "";
  const t = Math.round(s);
  const hh = Math.floor(t / 3600), mm = Math.floor((t % 3600) / 60), ss = t % 60;
  return (hh ? hh + "h " : "") + (hh || mm ? mm + "m " : "") + ss + "s";
}

function lineChart(m, width) {
  const box = h("div", { class: "rw-plot" });
  const series = [{ label: m.x_label || "step" }];
  let data;
  if (m.min) {  // one variable: min and max per bucket of steps (equal when every point is shown)
    const same = m.min.every((v, i) => v === m.max[i]);
    data = same ? [m.x, m.max] : [m.x, m.min, m.max];
    series.push({ label: same ? m.name : "min", stroke: "#1f77b4", width: 1.5, spanGaps: true });
    if (!same) series.push({ label: "max", stroke: "#ff7f0e", width: 1, spanGaps: true });
  } else {      // two variables: x against y
    data = [m.x, m.y];
    series.push({ label: m.y_label, stroke: "#2ca02c", width: 1.5, points: { show: true, size: 5 } });
  }
  const opts = { width, height: 180, series, scales: { x: { time: false } }, legend: { show: true },
                 axes: [{ label: m.x_label || "step" }, {}] };
  try { new uPlot(opts, data, box); } catch (e) { box.appendChild(h("pre", { class: "rw-err" }, String(e))); }
  return box;
}

function metricCard(m, width) {
  const card = h("div", { class: "rw-chart", "data-metric": m.name, "data-kind": m.kind },
                 h("div", { class: "rw-chart-title" }, m.name, h("span", { class: "rw-kind" }, m.kind)));
  if (m.kind === "image") {
    card.appendChild(m.image ? h("img", { class: "rw-image", src: m.image, alt: m.file })
                             : h("div", { class: "rw-muted" }, m.file || "image not available"));
  } else if (m.x) {
    card.appendChild(lineChart(m, width));
    if (m.points) card.appendChild(h("div", { class: "rw-muted" }, `${m.points} values, last ${fmt(m.last)}`));
  } else {
    card.appendChild(h("div", { class: "rw-value" }, fmt(m.value)));
  }
  return card;
}

function childrenChart(s) {
  // the children's chosen metric as bars, the best child marked
  const rows = s.children.filter((c) => typeof c.value === "number");
  if (!rows.length) return null;
  const w = 560, bh = 18, pad = 120;
  const vals = rows.map((r) => r.value);
  const lo = Math.min(0, ...vals), hi = Math.max(...vals);
  const scale = (v) => ((v - lo) / (hi - lo || 1)) * (w - pad - 110);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w);
  svg.setAttribute("height", rows.length * (bh + 6) + 6);
  svg.setAttribute("class", "rw-children-chart");
  rows.forEach((r, i) => {
    const y = 6 + i * (bh + 6);
    const best = r.run_id === s.best_child;
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 0); label.setAttribute("y", y + 13); label.textContent = r.name.slice(0, 16);
    const bar = document.createElementNS(ns, "rect");
    bar.setAttribute("x", pad); bar.setAttribute("y", y); bar.setAttribute("height", bh);
    bar.setAttribute("width", Math.max(1, scale(r.value)));
    bar.setAttribute("class", best ? "rw-bar rw-best" : "rw-bar");
    if (best) bar.setAttribute("data-best", "true");
    const val = document.createElementNS(ns, "text");
    val.setAttribute("x", pad + Math.max(1, scale(r.value)) + 4); val.setAttribute("y", y + 13);
    val.textContent = fmt(r.value) + (best ? "  ★ best" : "");
    svg.append(label, bar, val);
  });
  return svg;
}

function render({ model, el }) {
  const root = h("div", { class: "rw-root" });
  el.appendChild(root);

  function draw() {
    const s = model.get("state") || {};
    const width = Math.max(280, Math.min(420, (el.clientWidth || 900) / 2 - 24));
    root.replaceChildren();
    const status = s.status || "";
    root.appendChild(h("div", { class: "rw-header" },
      h("span", { class: `rw-status rw-${status}`, "data-status": status }, status || "…"),
      h("span", { class: "rw-title" }, s.display_name || s.run_id || ""),
      s.experiment ? h("span", { class: "rw-muted" }, ` · ${s.experiment}`) : null,
      s.elapsed_s !== undefined && s.elapsed_s !== null ? h("span", { class: "rw-elapsed" }, ` · ${duration(s.elapsed_s)}`) : null,
      s.portal_url ? h("a", { href: s.portal_url, target: "_blank", class: "rw-link" }, "open the run's page") : null));
    if (s.stack_error) root.appendChild(h("div", { class: "rw-warn" },
      `The runwatch stack cannot be reached (${s.stack_error}); trying again every ${s.refresh_interval}s.`));
    if (s.error) root.appendChild(h("div", { class: "rw-error" }, "Error: " + (s.error.message || JSON.stringify(s.error))));
    const kv = Object.entries(Object.assign({}, s.tags || {}, s.properties || {}));
    if (kv.length) root.appendChild(h("table", { class: "rw-kv" },
      kv.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v === null ? "" : String(v))))));

    // the run's own metrics, then its system metrics (CPU, memory, GPU: docs/system-metrics.md) apart
    for (const [title, system] of [["Metrics", false], ["System", true]]) {
      const shown = (s.metrics || []).filter((m) => !!m.system === system);
      const charts = h("div", { class: "rw-charts", "data-section": system ? "system" : "metrics" });
      shown.forEach((m) => charts.appendChild(metricCard(m, width)));
      if (shown.length) root.append(h("h4", {}, title), charts);
    }

    if ((s.files || []).length) {
      const select = h("select", { class: "rw-file-select", onchange: (e) => {
        model.set("selected_file", e.target.value); model.save_changes(); } },
        s.files.map((f) => h("option", f === s.selected_file ? { value: f, selected: "selected" } : { value: f }, f)));
      root.append(h("h4", {}, "Log files"), select,
        h("pre", { class: "rw-log", "data-file": s.selected_file || "" }, (s.log_tail || []).join("\n")));
    }

    if ((s.children || []).length) {
      const metricSelect = (s.child_metric_options || []).length ? h("select", { class: "rw-child-metric", onchange: (e) => {
        model.set("child_metric", e.target.value); model.save_changes(); } },
        s.child_metric_options.map((m) => h("option", m === s.child_metric ? { value: m, selected: "selected" } : { value: m }, m))) : null;
      root.appendChild(h("h4", {}, "Child runs ", metricSelect));
      root.appendChild(h("table", { class: "rw-children" },
        h("tr", {}, h("th", {}, "run"), h("th", {}, "status"), h("th", {}, "duration"),
          h("th", {}, `${s.child_metric || "metric"} (${s.goal || "min"})`)),
        s.children.map((c) => h("tr", c.run_id === s.best_child ? { class: "rw-best-row", "data-best": "true" } : {},
          h("td", {}, c.name), h("td", {}, c.status), h("td", {}, duration(c.duration_s)), h("td", {}, fmt(c.value))))));
      const chart = childrenChart(s);
      if (chart) root.appendChild(chart);
    }
    root.appendChild(h("div", { class: "rw-footer" },
      (s.polling ? `refreshing every ${s.refresh_interval}s` : TERMINAL.has(status) ? "final" : "not refreshing")
      + (s.refreshed_at ? ` · updated ${s.refreshed_at}` : "")));
  }

  draw();
  model.on("change:state", draw);
  return () => model.off("change:state", draw);
}

export default { render };
