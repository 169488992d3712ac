// The output panel's tabs: Result, Code, History.
import { renderCode } from "./code.js";
import { renderHistory } from "./history.js";
import { $ } from "./state.js";

export const TABS = ["result", "code", "history"];

export function selectTab(name) {
  for (const tab of TABS) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`pane-${tab}`).hidden = tab !== name;
  }
  if (name === "code") renderCode();
  if (name === "history") renderHistory();
}
