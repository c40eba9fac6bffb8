"use strict";
// Login (the token goes in a JSON POST body, never in a URL) and the list of studies.

const $ = (id) => document.getElementById(id);

async function listStudies() {
  const response = await fetch("/viewer/api/studies", {cache: "no-store"});
  if (response.status === 401) {
    $("login").hidden = false;
    $("studies").hidden = true;
    $("logout").hidden = true;
    return false;
  }
  const {studies} = await response.json();
  $("login").hidden = true;
  $("logout").hidden = false;
  const body = $("studies").querySelector("tbody");
  body.replaceChildren();
  for (const study of studies) {
    const row = body.insertRow();
    const link = document.createElement("a");
    link.href = "/viewer/study?study=" + encodeURIComponent(study.folder);
    link.textContent = study.study_id || study.folder;
    row.insertCell().append(link);
    row.insertCell().textContent = study.state || "";
    row.insertCell().textContent = study.roi_complete ? "yes" : "no";
    row.insertCell().textContent = study.verified_sha256 === true ? "yes" :
      (study.verified_sha256 === false ? "MISMATCH" : "-");
  }
  $("studies").hidden = studies.length === 0;
  $("empty").hidden = studies.length !== 0;
  return true;
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("/viewer/login", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token: $("token").value}),
  });
  $("token").value = "";
  if (response.ok) {
    $("login-error").textContent = "";
    await listStudies();
  } else {
    $("login-error").textContent = response.status === 429 ?
      "Too many failed logins: wait a minute." : "Wrong viewer token.";
  }
});

$("logout").addEventListener("click", async () => {
  await fetch("/viewer/logout", {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: "{}"});
  await listStudies();
});

(async function refresh() {
  try {
    await listStudies();
  } finally {
    setTimeout(refresh, 2000);
  }
})();
