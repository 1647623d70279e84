// Draws the release page's chart from /release/data, through charts.js: answers and mean latency of each
// variant over the release.
"use strict";
(async function () {
  const canvas = document.getElementById("release-chart");
  if (!canvas) return;
  const data = await chartData("/release/data");
  if (!data) return;
  const times = [...new Set(data.history.map((h) => h.at))].sort((a, b) => a - b);
  const labels = times.map((t) => new Date(t * 1000).toLocaleTimeString());
  const series = (variant, field) => times.map((t) => {
    const h = data.history.find((x) => x.at === t && x.variant === variant);
    return h ? h[field] : null;
  });
  new Chart(canvas, {
    data: {
      labels,
      datasets: [
        { type: "bar", label: "live answers", data: series("live", "answers"), backgroundColor: "#4f8fd1", yAxisID: "n" },
        { type: "bar", label: "candidate answers", data: series("candidate", "answers"), backgroundColor: "#e08a1e", yAxisID: "n" },
        { type: "line", label: "live mean latency (s)", data: series("live", "mean_latency_s"), borderColor: "#2563a8", yAxisID: "s" },
        { type: "line", label: "candidate mean latency (s)", data: series("candidate", "mean_latency_s"), borderColor: "#c43d3d", yAxisID: "s" },
      ],
    },
    options: { spanGaps: true, scales: { n: { position: "left", beginAtZero: true, ticks: { precision: 0 } },
                                         s: { position: "right", beginAtZero: true } } },
  });
  document.body.dataset.chartsReady = "1";
})();
