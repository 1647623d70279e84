// What every chart page shares: its data fetched from this origin (no inline script: the Content-Security-Policy
// allows this origin's scripts only), Chart.js without animation, so a chart is final once drawn, and the body's
// data-charts-error / data-charts-ready flags that the browser tests wait on.
"use strict";
async function chartData(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) {
    document.body.dataset.chartsError = String(response.status);
    return null;
  }
  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;
  return response.json();
}
