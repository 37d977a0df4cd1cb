// hyads inspection page: upload images, show overlay + verdict, keep a history, re-colour with a threshold slider.
"use strict";
const history = [];  // {time, name, score}
const $ = (id) => document.getElementById(id);

function threshold() { return parseFloat($("threshold").value); }
function verdictOf(score) { return score >= threshold() ? "defect" : "normal"; }

function render() {
  const t = threshold().toFixed(2);
  $("thr-out").textContent = t;
  $("thr-now").textContent = t;
  const body = $("history").querySelector("tbody");
  body.innerHTML = "";
  for (const h of history.slice().reverse()) {
    const tr = document.createElement("tr");
    const v = verdictOf(h.score);
    for (const text of [h.time, h.name, h.score.toFixed(3), v]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    tr.lastChild.className = v;
    body.appendChild(tr);
  }
  if (history.length) {
    const last = history[history.length - 1];
    const v = verdictOf(last.score);
    $("verdict").textContent = v;
    $("verdict").className = v;
  }
}

async function send(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  $("error").hidden = true;
  let res;
  try {
    res = await fetch("/v1/predict?return=overlay&embed=true", { method: "POST", body: form });
  } catch (e) {
    showError("network error: " + e);
    return;
  }
  const data = await res.json();
  if (!res.ok) { showError(data.error || ("HTTP " + res.status)); return; }
  $("current").hidden = false;
  $("overlay").src = "data:image/png;base64," + data.png_base64;
  $("score").textContent = data.score.toFixed(3);
  $("area").textContent = (100 * data.defect_area_fraction).toFixed(1) + " %";
  $("timing").textContent = data.timing_ms;
  history.push({ time: new Date().toLocaleTimeString(), name: file.name, score: data.score });
  if (history.length > 50) history.shift();
  render();
}

function showError(msg) {
  $("current").hidden = false;
  $("error").hidden = false;
  $("error").textContent = msg;
}

async function sendAll(files) { for (const f of files) await send(f); }

$("file").addEventListener("change", (e) => sendAll(e.target.files));
$("threshold").addEventListener("input", render);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); sendAll(e.dataTransfer.files); });

fetch("/v1/model").then((r) => r.json()).then((m) => {
  $("model-info").textContent = `${m.config.backbone}, bank ${m.bank_size} patches, hyads ${m.hyads_version}`;
}).catch(() => { $("model-info").textContent = "model info unavailable"; });
render();
