// Draws the analytics page from /analytics/data (same query string as the page), through charts.js.
"use strict";
(async function () {
  const data = await chartData("/analytics/data" + window.location.search);
  if (!data) return;
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  const counts = { beginAtZero: true, ticks: { precision: 0 } };
  const line = (id, datasets, y = counts) => new Chart(document.getElementById(id), {
    type: "line", data: { labels: data.days, datasets }, options: { spanGaps: true, scales: { y } },
  });
  const bar = (id, labels, datasets, extra = {}) => new Chart(document.getElementById(id), {
    type: "bar", data: { labels, datasets }, options: { scales: { x: counts, y: counts }, ...extra },
  });
  const hours = Array.from({ length: 24 }, (_, h) => String(h).padStart(2, "0") + ":00");
  bar("messages-per-day", data.days, [{ label: "messages", data: data.messages.per_day, backgroundColor: "#2563a8" }]);
  bar("messages-per-hour", hours, [{ label: "messages", data: data.messages.per_hour, backgroundColor: "#4f8fd1" }]);
  line("active-users", [{ label: "active users", data: data.active_users.per_day, borderColor: "#3a9a4f" }]);
  line("latency", [
    { label: "p50", data: data.latency.p50, borderColor: "#2563a8" },
    { label: "p99", data: data.latency.p99, borderColor: "#c43d3d" },
  ], { beginAtZero: true });
  const d = data.messages.delivery;
  new Chart(document.getElementById("delivery"), {
    type: "doughnut",
    data: { labels: ["passive", "pushed", "pulled"],
            datasets: [{ data: [d.passive, d.push, d.pull], backgroundColor: ["#2563a8", "#e08a1e", "#3a9a4f"] }] },
  });
  line("problems", [
    { label: "filter hits", data: data.filter_hits, borderColor: "#8a4fd1" },
    { label: "failed pushes", data: data.errors, borderColor: "#c43d3d" },
  ]);
  bar("commands", data.top_commands.map((c) => c[0]),
      [{ label: "uses", data: data.top_commands.map((c) => c[1]), backgroundColor: "#e08a1e" }], { indexAxis: "y" });
  document.getElementById("total-messages").textContent = sum(data.messages.per_day);
  document.getElementById("total-users").textContent = data.active_users.total;
  document.getElementById("total-filter-hits").textContent = sum(data.filter_hits);
  document.getElementById("total-errors").textContent = sum(data.errors);
  document.body.dataset.chartsReady = "1";
})();
