-- Argo CD health check for wal-listener.io/WalListener
-- (argocd-cm: resource.customizations.health.wal-listener.io_WalListener).
-- Suspended: spec.suspend. Progressing: the operator has not reported on the current generation, or
-- Ready is False for a reason that resolves by itself (PodNotReady, RollingOut, Unreachable, ...).
-- Degraded: Ready is False for a reason a person must fix. Healthy: Ready is True for this generation.
local hs = {}

local needs_a_person = {
  InvalidSpec = true,
  Conflict = true,
  SlotLost = true,
  SlotMissing = true,
  Refused = true,
  LoginRefused = true,
  SecretMissing = true,
  TablesMissing = true,
}

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Suspended (spec.suspend): the listener is scaled to zero, the slot keeps its position"
  return hs
end

local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report a status"
  return hs
end

local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if status.observedGeneration == nil or (generation ~= nil and status.observedGeneration ~= generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = nil
for _, condition in ipairs(status.conditions) do
  if condition.type == "Ready" then
    ready = condition
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

local reason = ready.reason or ""
local message = ready.message or ""
if message == "" then
  message = reason
elseif reason ~= "" then
  message = reason .. ": " .. message
end

if ready.status == "True" then
  hs.status = "Healthy"
elseif ready.status == "False" and needs_a_person[reason] then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = message
return hs
