"use strict";
// Time charts in plain SVG (no library): lines over a time axis, a y axis from 0 to a round top,
// a legend when there are several lines, and a gap wherever samples are missing.

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2f5d8a", "#c0612b", "#1f7a3a", "#8a3f8a", "#a86400", "#3b8a8a", "#b3261e"];

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// 0.37 -> 0.5, 7 -> 10, 1234 -> 2000: a top for the y axis that reads well.
function niceTop(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function formatMinutesAgo(seconds) {
  if (seconds < 1) return "now";
  return seconds >= 120 ? `−${Math.round(seconds / 60)} min` : `−${Math.round(seconds)} s`;
}

// series: [{name, points: [[unixSeconds, valueOrNull], ...]}];
// options: {window, end, format, gap (seconds without a sample that break a line), legend}
function drawTimeChart(svg, series, options) {
  const box = svg.getBoundingClientRect();
  const W = Math.max(200, Math.round(box.width || 400));
  const H = Math.max(100, Math.round(box.height || 150));
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const left = 48;
  const right = 8;
  const top = 8;
  const bottom = 20;
  const end = options.end;
  const start = end - options.window;
  const format = options.format || ((v) => String(v));
  const values = series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => v !== null);
  const ymax = niceTop(Math.max(0, ...values));
  const x = (t) => left + ((t - start) / (end - start)) * (W - left - right);
  const y = (v) => H - bottom - (v / ymax) * (H - top - bottom);
  const nodes = [];
  for (const fraction of [0, 0.5, 1]) {
    const v = ymax * fraction;
    nodes.push(svgEl("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
    nodes.push(svgEl("text", { class: "axis", x: left - 4, y: y(v) + 4, "text-anchor": "end" }, format(v)));
  }
  for (const ago of [options.window, options.window / 2, 0]) {
    const anchor = ago === options.window ? "start" : ago === 0 ? "end" : "middle";
    nodes.push(svgEl("text", { class: "axis", x: x(end - ago), y: H - 4, "text-anchor": anchor }, formatMinutesAgo(ago)));
  }
  const gap = options.gap || Infinity;
  series.forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    let run = [];
    let last = null;
    const flush = () => {
      if (run.length) {
        const points = run.length > 1 ? run : [run[0], [run[0][0] + 1, run[0][1]]];
        const text = points.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" ");
        nodes.push(svgEl("polyline", { class: "line", points: text, stroke: color }));
      }
      run = [];
    };
    for (const [t, v] of s.points) {
      if (t < start) continue;
      if (v === null || v === undefined || (last !== null && t - last > gap)) flush();
      if (v !== null && v !== undefined) run.push([x(t), y(v)]);
      last = t;
    }
    flush();
    if (series.length > 1 || options.legend) {
      const lx = left + 8 + (i % 3) * Math.max(120, (W - left) / 3);
      const ly = top + 10 + Math.floor(i / 3) * 14;
      nodes.push(svgEl("rect", { x: lx, y: ly - 8, width: 10, height: 3, fill: color }));
      nodes.push(svgEl("text", { class: "legend", x: lx + 14, y: ly - 4 }, s.name));
    }
  });
  if (!values.length) {
    nodes.push(svgEl("text", { class: "axis", x: W / 2, y: H / 2, "text-anchor": "middle" }, "no samples yet"));
  }
  svg.replaceChildren(...nodes);
  svg.dataset.points = String(values.length);
}

window.rbeeCharts = { drawTimeChart, niceTop };
